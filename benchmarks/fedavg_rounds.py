"""Rounds to a target accuracy: FedSGD vs FedAvg over an (E, B) grid (McMahan et al., Table 2).

The paper's question on the data we have: 5,000 real MNIST training digits split over 100
clients (IID and McMahan's pathological non-IID `shards`), C = 0.1, evaluated on the real
10,000-image MNIST test set. FedSGD is E = 1, B = full; FedAvg trains more locally per
round. For each configuration we report the rounds needed to reach --target and the
speedup in rounds over FedSGD on the same partition; a run that does not reach the
target within --max-rounds is reported as not reached.

    .venv/bin/python benchmarks/fedavg_rounds.py              # full grid, JSON + PNG in benchmarks/results/
    .venv/bin/python benchmarks/fedavg_rounds.py --quick      # a smaller grid for a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from mlsyskit.fl import FLConfig, run  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2nn", help="model (default: 2nn, the paper's MLP; cnn is ~40x slower per round here)")
    p.add_argument("--target", type=float, default=0.90, help="target test accuracy (default: 0.90)")
    p.add_argument("--max-rounds", type=int, default=300, help="give up after this many rounds (default: 300)")
    p.add_argument("--epochs", default="1,5,20", help="local epochs E of the grid (default: 1,5,20)")
    p.add_argument("--batches", default="full,25,10", help="local batch sizes B of the grid (default: full,25,10; each client holds 50 digits, so B=50 would equal full)")
    p.add_argument("--partitions", default="iid,shards", help="partitions (default: iid,shards)")
    p.add_argument("--lr", type=float, default=0.1, help="client learning rate, the same for every configuration (default: 0.1)")
    p.add_argument("--clients", type=int, default=100, help="clients (default: 100)")
    p.add_argument("--fraction", type=float, default=0.1, help="client fraction C (default: 0.1)")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="data folder with the MNIST test set (default: $MLSYSKIT_DATA_DIR or ../shared/data)")
    p.add_argument("--out", default=str(common.RESULTS / "fedavg_rounds.json"), help="JSON output (default: benchmarks/results/fedavg_rounds.json; the PNG goes beside it)")
    p.add_argument("--quick", action="store_true", help="smoke run: E in {1,5}, B in {full,10}, IID only, target 0.85, max 100 rounds")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.epochs, args.batches, args.partitions, args.target, args.max_rounds = "1,5", "full,10", "iid", 0.85, 100
    grid = [(int(e), None if b == "full" else int(b)) for e in args.epochs.split(",") for b in args.batches.split(",")]
    grid.sort(key=lambda eb: (eb != (1, None), eb[0], -(eb[1] or 10**9)))  # FedSGD first: the reference
    data_dir = args.data_dir if Path(args.data_dir).is_dir() else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.partitions.split(","):
            for e, b in grid:
                name = "FedSGD" if (e, b) == (1, None) else "FedAvg"
                cfg = FLConfig(
                    dataset="mnist-5k", data_dir=data_dir, model=args.model, clients=args.clients,
                    partition=part, fraction=args.fraction, local_epochs=e, batch_size=b, lr=args.lr,
                    rounds=args.max_rounds, target_accuracy=args.target, seed=0,
                    out=f"{tmp}/{part}-{e}-{b}", checkpoint_every=10**6,
                )
                s, secs = common.timed(run, cfg, progress=False)
                curve = [json.loads(line)["test_accuracy"] for line in open(Path(cfg.out) / "metrics.jsonl")]
                rows.append({
                    "algorithm": name, "partition": part, "E": e, "B": "full" if b is None else b,
                    "rounds_to_target": s["rounds_to_target"], "best_accuracy": s["best_accuracy"],
                    "seconds": round(secs, 2), "curve": curve,
                })
                print(f"{part:7s} {name:6s} E={e:<3d} B={'full' if b is None else b:<5} "
                      f"rounds to {args.target}: {s['rounds_to_target'] or '>' + str(args.max_rounds):>5}  "
                      f"best {s['best_accuracy']:.4f}  ({rows[-1]['seconds']} s)", flush=True)
    for r in rows:
        ref = next(x for x in rows if x["partition"] == r["partition"] and x["algorithm"] == "FedSGD")
        ok = r["rounds_to_target"] and ref["rounds_to_target"]
        r["speedup_vs_fedsgd"] = round(ref["rounds_to_target"] / r["rounds_to_target"], 2) if ok else None
    iid = {(r["E"], r["B"]): r["rounds_to_target"] for r in rows if r["partition"] == "iid"}
    sgd, best = iid.get((1, "full")), iid.get((5, 10))
    ordering = {
        "claim": "on IID data FedAvg with E=5, B=10 needs far fewer rounds than FedSGD (at least 5x)",
        "fedsgd_rounds": sgd, "fedavg_e5_b10_rounds": best,
        "holds": bool(best) and (sgd or args.max_rounds + 1) >= 5 * best,
    } if (5, 10) in iid else None
    result = {
        "benchmark": "fedavg_rounds", "model": args.model, "target_accuracy": args.target,
        "max_rounds": args.max_rounds, "lr": args.lr, "clients": args.clients, "fraction": args.fraction,
        "test_source": s["test_source"], "rows": rows, "paper_ordering": ordering,
    }
    out = common.write_json(args.out, result)
    plot(rows, args.target, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if ordering:
        print(f"paper ordering holds: {ordering['holds']} (FedSGD {sgd} rounds vs FedAvg E=5,B=10 {best})")


def plot(rows: list[dict], target: float, path: Path) -> None:
    plt = common.pyplot()
    parts = sorted({r["partition"] for r in rows})
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        for r in rows:
            if r["partition"] == part:
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=f"{r['algorithm']} E={r['E']} B={r['B']}")
        ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{part}: test accuracy per round")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.5, 1.0)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
