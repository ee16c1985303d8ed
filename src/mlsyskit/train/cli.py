"""`mlsyskit train`: data-parallel training, one process or under torchrun.

Imported on every `mlsyskit` invocation: nothing heavy at module level (torch and the
trainer are imported inside the handler).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from mlsyskit.runtime import add_progress_flag, show_progress
from mlsyskit.train.config import TrainConfig


def _flag_type(f: dataclasses.Field) -> Any:
    hint = str(f.type)
    return int if hint.startswith("int") else float if hint.startswith("float") else str


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {'on' if f.default else 'off'})")
            continue
        shown = "" if "default" in text else f" (default: {f.default})" if f.default is not None else " (default: off)"
        p.add_argument(flag, dest=f.name, type=_flag_type(f), default=None, metavar=f.name.upper(), help=text + shown)


def _slurm(args: argparse.Namespace, cfg: TrainConfig) -> int:
    from pathlib import Path

    from mlsyskit.errors import UserError
    from mlsyskit.train.slurm import SlurmOptions, sbatch_script

    opts = SlurmOptions(nodes=args.slurm_nodes, nproc_per_node=args.slurm_nproc_per_node,
                        gpus_per_node=args.slurm_gpus_per_node, cpus_per_task=args.slurm_cpus_per_task,
                        time=args.slurm_time, partition=args.slurm_partition, port=args.slurm_port)
    text = sbatch_script(cfg, opts)
    path = Path(args.slurm_script)
    try:
        path.write_text(text)
        path.chmod(0o755)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    print(f"wrote {path}: submit it with `sbatch {path}` ({opts.nodes} node(s) x {opts.nproc_per_node} rank(s))")
    return 0


def _train(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    set_flags = {k: v for k, v in given.items() if v is not None}
    if args.slurm_script:
        from mlsyskit.errors import UserError

        if args.resume:
            raise UserError("--slurm-script writes a script for a new run; drop --resume")
        cfg = TrainConfig(**set_flags).resolved()
        if cfg.out is None:
            cfg = dataclasses.replace(cfg, out=f"runs/train-{cfg.dataset}-{cfg.model}")
        return _slurm(args, cfg)
    from mlsyskit.errors import UserError
    from mlsyskit.train.trainer import resume, train

    progress = show_progress(args.progress)
    root = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    try:
        if args.resume:
            summary = resume(args.resume, set_flags, progress=progress)
        else:
            summary = train(TrainConfig(**set_flags), progress=progress)
    except UserError:
        if not root:  # every rank meets the same error; rank 0 alone prints it
            return 2
        raise
    if root:
        acc = summary["final_accuracy"]
        state = "complete" if summary["complete"] else f"stopped at step {summary['steps']} (--resume continues)"
        if acc is not None:
            print(f"test accuracy {acc:.4f} after {summary['epochs_run']} epoch(s), {summary['steps']} steps on "
                  f"{summary['world_size']} process(es); {state}")
        print(f"outputs in {summary['out']}/: config.json metrics.jsonl summary.json model.safetensors checkpoint.safetensors")
        print(json.dumps({k: summary[k] for k in ("final_accuracy", "final_test_loss", "epochs_run", "steps", "complete",
                                                   "world_size", "samples_per_s", "time_to_target_s", "out")}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="data-parallel training (DistributedDataParallel under torchrun; gloo on CPU, nccl on GPU)",
        description="Train a model on one process, or on every rank of `torchrun --nproc-per-node N -m mlsyskit "
        "train ...` (also --nnodes/--rdzv-endpoint) with DistributedDataParallel. Writes a run directory "
        "(rank 0): config.json, metrics.jsonl (one row per epoch), summary.json, model.safetensors and a "
        "checkpoint that --resume continues. Prints a JSON summary on its last line.",
    )
    _add_config_flags(p)
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its last checkpoint (model, optimizer, scaler, sampler position): "
                        "the same trajectory as an uninterrupted run; the world size may change (default: off)")
    add_progress_flag(p, "optimizer steps")
    s = p.add_argument_group("Slurm", "write an sbatch script for this run instead of training")
    s.add_argument("--slurm-script", metavar="FILE", default=None, help="write the sbatch script to FILE and exit")
    s.add_argument("--slurm-nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    s.add_argument("--slurm-nproc-per-node", type=int, default=1, metavar="P", help="ranks per node (default: 1)")
    s.add_argument("--slurm-gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node (default: 0)")
    s.add_argument("--slurm-cpus-per-task", type=int, default=None, metavar="C", help="CPUs per node task (default: one per rank)")
    s.add_argument("--slurm-time", default="01:00:00", metavar="T", help="time limit (default: 01:00:00)")
    s.add_argument("--slurm-partition", default=None, metavar="NAME", help="partition (default: the cluster's)")
    s.add_argument("--slurm-port", type=int, default=29500, metavar="PORT", help="rendezvous port on the first node (default: 29500)")
    p.set_defaults(func=_train, interrupted="interrupted; the last checkpoint is kept (--resume DIR continues)")
