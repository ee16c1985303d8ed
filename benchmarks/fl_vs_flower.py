"""One federated experiment, three systems: Flower's simulation vs a hand-written loop vs mlsyskit.

The experiment is McMahan et al. (2017)'s FedAvg setup on MNIST-5k: the real 5,000
training digits split IID over 100 clients (mlsyskit.data.partition, seed 0), C=0.1 (10
clients a round), E=1 local epoch, B=10, McMahan's CNN (same init: torch.manual_seed(0)),
plain SGD lr=0.05, sample-weighted FedAvg, and central evaluation of the global model on
the full test set (the real 10,000 MNIST test images when the data dir holds them) after
every round. The systems:

  flower    Flower's simulation (Ray backend) written as Flower's PyTorch quickstart does
            it in flwr 1.41: a ClientApp (Message API) that trains with a DataLoader over
            its partition and torch.optim.SGD, a ServerApp running the built-in FedAvg
            (fraction_train=0.1, fraction_evaluate=0) with a server-side evaluate_fn.
  plain     the sequential PyTorch loop a student writes (deepcopy, DataLoader, SGD,
            weighted average of state_dicts, DataLoader evaluation).
  mlsyskit  mlsyskit.fl.run(FLConfig(...)); per-round times from its metrics.jsonl.
  classic   the two-client baseline students write first (784-64-10 MLP, 2 clients,
            2 rounds, 2 local epochs, B=10, unweighted average), next to mlsyskit
            running the same configuration.

Every system runs in its own subprocess (this script re-invoked with --system NAME), so
its peak memory can be measured: the parent polls the child's whole process tree (Ray
starts many processes) every --poll-interval seconds and records the peak of the SUM of
RSS over the tree (and, less often, the sum of PSS, which counts shared pages once).

Results go to benchmarks/results/fl_vs_flower.json and a bar chart next to it (.png).
Run:  .venv/bin/python benchmarks/fl_vs_flower.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# The systems live in fl_peers (plain, mlsyskit, classic, noise) and fl_flower_peer (Flower);
# summaries, goals, roofline, chart and table in fl_report. This file starts and watches them.
import common  # noqa: E402
from fl_flower_peer import run_flower  # noqa: E402
from fl_peers import (  # noqa: E402
    BATCH_SIZE,
    CLIENTS,
    CNN_SYSTEMS,
    DATASET,
    FLOWER_EVAL_BATCH,
    FRACTION,
    LOCAL_EPOCHS,
    LR,
    MODEL,
    PLAIN_EVAL_BATCH,
    SEED,
    SYSTEMS,
    run_classic,
    run_mlsyskit,
    run_noise,
    run_plain,
    sampled_clients,
)
from fl_report import compare, plot, print_table, roofline, summarise  # noqa: E402

DEFAULT_OUT = common.RESULTS / "fl_vs_flower.json"

CHILD_RUNNERS = {
    "flower": run_flower,
    "plain": run_plain,
    "mlsyskit": run_mlsyskit,
    "classic": run_classic,
    "noise": run_noise,
}


def child_main(args: argparse.Namespace) -> int:
    result = CHILD_RUNNERS[args.system](args)
    result["child_done_wall"] = time.time()
    common.write_json(args.json_out, result, indent=1, default=str)
    return 0


def run_child(name: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    out = scratch / f"{name}.json"
    log = scratch / f"{name}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--system", name,
        "--json-out", str(out),
        "--rounds", str(args.rounds),
        "--noise-reps", str(args.noise_reps),
        "--scratch", str(scratch),
    ]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DISABLE_DOCKER_CPU_WARNING="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    if args.data_dir:
        env["MLSYSKIT_DATA_DIR"] = args.data_dir
    # Peak memory of the whole process tree (Ray starts many processes), load and CPU noise.
    res, spawn, end = common.run_peer(
        cmd, log, env=env, cwd=common.REPO, poll_interval=args.poll_interval,
        pss_interval=args.pss_interval, timeout=args.child_timeout,
    )
    if res["exit_code"] != 0 or not out.exists():
        tail = log.read_text(errors="replace").splitlines()[-40:]
        res["error"] = "\n".join(tail)
        return res
    child = json.loads(out.read_text())
    if child.get("first_round_wall"):
        res["startup_s"] = child["first_round_wall"] - spawn
    if child.get("ray_ready_wall"):
        res["ray_ready_s"] = child.pop("ray_ready_wall") - spawn
    if child.get("last_round_end_wall"):
        res["teardown_s"] = end - child["last_round_end_wall"]
    for key in ("first_round_wall", "last_round_end_wall", "child_done_wall"):
        child.pop(key, None)
    res.update(child)
    return res


def parent_main(args: argparse.Namespace) -> int:
    systems = common.split_names(args.systems)
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        print(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    if args.data_dir and not Path(args.data_dir).is_dir():
        print(f"--data-dir {args.data_dir} is not a directory", file=sys.stderr)
        return 2
    import psutil  # noqa: F401 - fail early if missing

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="fl_vs_flower-"))
    scratch.mkdir(parents=True, exist_ok=True)
    todo = list(systems)
    if args.noise_reps >= 2 and "mlsyskit" in systems and ({"flower", "plain"} & set(systems)):
        todo.append("noise")

    results: dict[str, dict[str, Any]] = {}
    for name in todo:
        print(f"[fl_vs_flower] running {name} ({args.rounds} rounds) ...", flush=True)
        res = run_child(name, args, scratch)
        if "error" in res:
            print(f"[fl_vs_flower] {name} FAILED (exit {res['exit_code']}); last log lines:\n{res['error']}", flush=True)
        else:
            print(
                f"[fl_vs_flower] {name} done in {res['process_wall_s']:.1f} s "
                f"(peak RSS {res['peak_rss_mib']:.0f} MiB, load before {res['loadavg_1m_before']})",
                flush=True,
            )
        results[name] = summarise(res)
        time.sleep(args.settle)

    import torch

    test_source = next((r.get("test_source") for r in results.values() if r.get("test_source")), None)
    report: dict[str, Any] = {
        "benchmark": "fl_vs_flower",
        **common.run_stamp(),
        "host": {
            **common.platform_info(),
            "cpus": common.usable_cpus(),
            "torch": torch.__version__,
            "note": "shared, noisy machine: compare loadavg_1m_before/after of each system",
        },
        "experiment": {
            "dataset": DATASET,
            "data_dir": args.data_dir,
            "test_source": test_source,
            "model": MODEL,
            "clients": CLIENTS,
            "partition": "iid (mlsyskit.data.partition, seed 0)",
            "fraction": FRACTION,
            "clients_per_round": max(int(round(FRACTION * CLIENTS)), 1),
            "local_epochs": LOCAL_EPOCHS,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "optimizer": "plain SGD, no momentum",
            "aggregation": "sample-weighted FedAvg",
            "init": "torch.manual_seed(0); build_model('cnn')",
            "rounds": args.rounds,
            "sampled_clients": {str(r): sampled_clients(SEED, r) for r in range(1, args.rounds + 1)},
            "sampling_note": "plain and mlsyskit use np.random.default_rng([0, round]).choice(100, 10, "
            "replace=False) sorted; Flower samples with its own random.sample, see "
            "systems.flower.clients_per_round and same_clients_as_mlsyskit",
            "eval_batch_size": {
                "plain": PLAIN_EVAL_BATCH,
                "flower": FLOWER_EVAL_BATCH,
                "mlsyskit": "see systems.mlsyskit.eval_batch_size (mlsyskit.fl.client.evaluate's default)",
            },
            "timing_note": "means and medians skip round 1 (warm-up: first-call initialisation, "
            "Flower's actors loading their data); round-1 values are reported as *_round1. "
            "startup_s = from spawning the system's process to the start of round 1 (imports, "
            "data loading, Ray start, model build; for Flower also its round-0 evaluation of "
            "the initial model, which overlaps Ray's start; see initial_eval_s and ray_ready_s)",
            "memory_note": f"peak of the sum of RSS over the system's whole process tree, polled every "
            f"{args.poll_interval} s (shared pages are counted once per process); peak_pss_mib "
            f"(sampled every {args.pss_interval} s) counts shared pages proportionally",
        },
        "systems": results,
    }
    fl = results.get("flower", {})
    ml = results.get("mlsyskit", {})
    if fl.get("clients_per_round") and ml.get("clients_per_round"):
        fl["same_clients_as_mlsyskit"] = fl["clients_per_round"] == ml["clients_per_round"]
    report.update(compare(results, args.rounds))
    if any(results.get(n, {}).get("train_s_mean") for n in CNN_SYSTEMS):
        report["roofline"] = roofline(results)

    out = common.write_json(args.out, report, default=str)
    png = out.with_suffix(".png")
    plot(results, png, args.rounds)
    print_table(report)
    print(f"\nwrote {out}" + (f" and {png}" if png.exists() else ""))
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        print(f"kept logs in {scratch} (failed: {', '.join(failed)})")
    elif not args.keep_scratch and not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"kept scratch dir {scratch}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FedAvg on MNIST-5k (100 IID clients, C=0.1, E=1, B=10, McMahan CNN, SGD lr 0.05) "
        "run by Flower's simulation (Ray), a hand-written PyTorch loop and mlsyskit, plus the "
        "classic two-client MLP baseline; each system in its own process with its peak memory "
        "measured. Writes a JSON report and a PNG bar chart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=5, help="communication rounds R of the CNN experiment")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds (overrides --rounds)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run: flower (Flower simulation, Ray), plain (hand-written "
        "sequential PyTorch loop), mlsyskit (mlsyskit.fl.run), classic (two-client MLP baseline, "
        "student loop next to mlsyskit)",
    )
    p.add_argument(
        "--data-dir",
        default=common.default_data_dir(existing_only=True),
        help="data dir with mnist/ (the real 10k MNIST test set is used when present); default "
        "$MLSYSKIT_DATA_DIR, else ../shared/data next to the repo",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report path (the PNG chart goes next to it)")
    p.add_argument(
        "--noise-reps",
        type=int,
        default=3,
        help="untimed reruns of the plain loop with other shuffles/client samples, to estimate the "
        "accuracy noise for the 'equal within noise' goal (< 2: fixed tolerance 0.01)",
    )
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between RSS samples of a system's process tree")
    p.add_argument("--pss-interval", type=float, default=1.0, help="seconds between (costlier) PSS samples")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a system's process tree is killed")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to pause between systems")
    p.add_argument("--scratch", default=None, help="scratch dir for logs and run dirs (default: a new temp dir, removed on success)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch dir (logs, mlsyskit run dirs)")
    p.add_argument("--system", choices=sorted(CHILD_RUNNERS), default=None, help="internal: run one system in this process")
    p.add_argument("--json-out", default=None, help="internal: where the --system child writes its result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds = 2
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if args.system:
        if not args.json_out or not args.scratch:
            print("--system needs --json-out and --scratch", file=sys.stderr)
            return 2
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
