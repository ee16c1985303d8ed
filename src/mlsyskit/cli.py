"""The `mlsyskit` command line: parses flags and delegates to the subpackages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from mlsyskit import __version__
from mlsyskit.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


FULL = "full"  # parsed value of --batch-size full (None means "flag not given")


def _batch_size(text: str) -> int | str:
    if text == FULL:
        return FULL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid batch size {text!r}; give a positive integer or 'full'") from None


def _arg_type(f: dataclasses.Field) -> Any:
    if f.name == "batch_size":
        return _batch_size
    hint = str(f.type)
    return int if "int" in hint else float if "float" in hint else str


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field; the help text and default shown come from the field."""
    for f in dataclasses.fields(cls):
        default = "full" if f.name == "batch_size" and f.default is None else f.default
        help_text = f.metadata["help"]
        if default is not None:
            shown = f" (default: {default})"
        else:  # None defaults are either explained in the help text or mean "off"
            shown = "" if "default" in help_text else " (default: off)"
        if str(f.type) == "bool":  # an on/off switch (--secagg)
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true", default=None, help=help_text + " (default: off)")
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_arg_type(f),
            default=None,
            metavar=f.metadata.get("metavar", f.name.upper()),
            help=help_text + shown,
        )


def _fedavg(args: argparse.Namespace) -> int:
    from mlsyskit.fl import FLConfig, resume, run

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FLConfig)}
    full = given["batch_size"] == FULL
    given = {k: v for k, v in given.items() if v is not None and v != FULL}
    if args.resume:
        if full:
            given["batch_size"] = None  # given explicitly: resume refuses a change
        summary = resume(args.resume, given, progress=not args.quiet)
    else:
        cfg = FLConfig(**given)
        if full:
            cfg.batch_size = None
        summary = run(cfg, progress=not args.quiet)
    acc = summary["final_accuracy"]
    print(json.dumps({k: summary[k] for k in ("final_accuracy", "best_accuracy", "rounds_run", "rounds_to_target", "test_source")}))
    print(f"final test accuracy {acc:.4f} after {summary['rounds_run']} rounds" if acc is not None else "no evaluation ran")
    print(f"outputs in {summary['out']}/: config.json metrics.jsonl partition.json summary.json model.safetensors accuracy.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlsyskit", description="ML systems, for real: each technique next to its naive baseline.")
    parser.add_argument("--version", action="version", version=f"mlsyskit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    from mlsyskit.fl.config import FLConfig

    fed = sub.add_parser(
        "fedavg",
        help="federated learning (FedAvg, FedProx, server optimizers, robust aggregation) simulated on one machine",
        description="Federated learning as in McMahan et al. 2017, simulated on one machine. Writes a run "
        "directory with config.json, metrics.jsonl, partition.json, summary.json, model.safetensors, accuracy.png "
        "and a checkpoint that --resume continues.",
    )
    _add_config_flags(fed, FLConfig)
    fed.add_argument("--resume", metavar="DIR", default=None, help="continue the killed run in DIR from its last checkpoint (same trajectory as an uninterrupted run); only --rounds, --target-accuracy, --eval-every, --checkpoint-every, --parallel-clients and --threads may change (default: off)")
    fed.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    fed.set_defaults(func=_fedavg, interrupted="interrupted; the last checkpoint is kept (--resume DIR continues)")

    # Each subpackage declares its own subcommands; its cli module imports nothing heavy.
    from mlsyskit.bigdata import cli as bigdata_cli
    from mlsyskit.cluster import cli as cluster_cli
    from mlsyskit.engine import cli as engine_cli
    from mlsyskit.fl import cli as fl_cli
    from mlsyskit.hpc import cli as hpc_cli
    from mlsyskit.quant import cli as quant_cli
    from mlsyskit.serve import cli as serve_cli
    from mlsyskit.serve import router_cli
    from mlsyskit.train import cli as train_cli
    from mlsyskit.vector import cli as vector_cli

    engine_cli.register(sub)
    fl_cli.register(sub)
    quant_cli.register(sub)
    vector_cli.register(sub)
    train_cli.register(sub)
    hpc_cli.register(sub)
    router_cli.register(sub)
    serve_cli.register(sub)
    bigdata_cli.register(sub)
    cluster_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"mlsyskit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # each command may say what an interruption leaves behind (set_defaults(interrupted=...))
        print(f"\nmlsyskit {args.command}: {getattr(args, 'interrupted', 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
