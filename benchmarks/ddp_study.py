"""Data-parallel training study: batch size x backend x world size x precision, `mlsyskit
train` under torchrun, next to the same training written with HF Accelerate.

For every configuration: samples/s (mean over epochs), time per epoch, peak memory per rank
(the largest rank's peak RSS), the whole process tree's peak RSS, time to a target test
accuracy, and the scaling efficiency samples/s(W) / (W x samples/s(1)) at the same batch and
precision. Every rank gets --threads-per-rank torch threads (1: W ranks use W cores, the usual
definition of scaling efficiency; intra-op threads on a shared machine also suffer badly when
one of them is descheduled). nccl
runs only where there are GPUs (else the row says why it was skipped). Default: McMahan's CNN on
2,000 mnist-5k training images (1,000 test images), 2 epochs, the Accelerate peer at batch 64;
where the peer runs, ours and it take --reps turns in alternating order (medians reported); on a
quiet 2-CPU machine this takes about 4 minutes.

    .venv/bin/python benchmarks/ddp_study.py
    .venv/bin/python benchmarks/ddp_study.py --batch-sizes 64 --precisions fp32 --no-accelerate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent


def _torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]


def ours(cfg: dict, work: Path) -> dict:
    out = work / f"ours-b{cfg['batch_size']}-{cfg['backend']}-w{cfg['world']}-{cfg['precision']}-r{cfg.get('rep', 0)}"
    cmd = [*_torchrun(cfg["world"]), "-m", "mlsyskit", "train", "--model", cfg["model"], "--dataset", cfg["dataset"],
           "--epochs", str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]), "--lr", str(cfg["lr"]),
           "--precision", cfg["precision"], "--backend", cfg["backend"], "--threads", str(cfg["threads"]),
           "--test-limit", str(cfg["test_limit"]), "--train-limit", str(cfg["train_limit"]),
           "--target-accuracy", str(cfg["target"]), "--out", str(out),
           "--no-progress"]
    if cfg["data_dir"]:
        cmd += ["--data-dir", cfg["data_dir"]]
    report, _, _ = common.run_peer(cmd, work / f"{out.name}.log", timeout=3600)
    if report["exit_code"] != 0:
        return {"error": f"exit {report['exit_code']}, see {report['log']}", **report}
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"samples_per_s": summary["samples_per_s"], "epoch_s": sum(r["epoch_s"] for r in rows) / len(rows),
            "peak_mem_mb_per_rank": summary["peak_mem_mb"], "tree_peak_rss_mib": report["peak_rss_mib"],
            "time_to_target_s": summary["time_to_target_s"], "final_accuracy": summary["final_accuracy"],
            "epochs": rows, "loadavg_before": report["loadavg_1m_before"], "loadavg_after": report["loadavg_1m_after"],
            "cpu_s_other_processes": report["cpu_s_other_processes"], "process_wall_s": report["process_wall_s"]}


def accelerate_peer(cfg: dict, work: Path) -> dict:
    cmd = [*_torchrun(cfg["world"]), str(HERE / "ddp_accelerate_peer.py"), "--batch-size", str(cfg["batch_size"]),
           "--epochs", str(cfg["epochs"]), "--lr", str(cfg["lr"]), "--precision", cfg["precision"],
           "--threads", str(cfg["threads"]), "--test-limit", str(cfg["test_limit"]),
           "--train-limit", str(cfg["train_limit"]), "--target-accuracy", str(cfg["target"])]
    if cfg["data_dir"]:
        cmd += ["--data-dir", cfg["data_dir"]]
    log = work / f"accelerate-b{cfg['batch_size']}-w{cfg['world']}-{cfg['precision']}-r{cfg.get('rep', 0)}.log"
    report, _, _ = common.run_peer(cmd, log, timeout=3600)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if report["exit_code"] != 0 or not lines:
        return {"error": f"exit {report['exit_code']}, see {log}"}
    r = json.loads(lines[-1])
    return {"samples_per_s": r["samples_per_s"], "epoch_s": sum(e["epoch_s"] for e in r["rows"]) / len(r["rows"]),
            "peak_mem_mb_per_rank": r["peak_mem_mb"], "tree_peak_rss_mib": report["peak_rss_mib"],
            "time_to_target_s": r["time_to_target_s"], "final_accuracy": r["final_accuracy"], "epochs": r["rows"],
            "loadavg_before": report["loadavg_1m_before"], "loadavg_after": report["loadavg_1m_after"],
            "accelerate": r["accelerate"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="64,256", help="global batch sizes (default: 64,256)")
    p.add_argument("--backends", default="gloo,nccl", help="process-group back ends (default: gloo,nccl)")
    p.add_argument("--worlds", default="1,2", help="world sizes (default: 1,2)")
    p.add_argument("--precisions", default="fp32,bf16", help="precisions (default: fp32,bf16)")
    p.add_argument("--model", default="cnn", help="model (default: cnn)")
    p.add_argument("--dataset", default="mnist-5k", help="dataset (default: mnist-5k)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (default: 2)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    p.add_argument("--train-limit", type=int, default=2000, help="training images (default: 2000)")
    p.add_argument("--test-limit", type=int, default=1000, help="test images (default: 1000)")
    p.add_argument("--accelerate-batch-sizes", default="64", help="batch sizes at which the Accelerate peer also runs (default: 64)")
    p.add_argument("--target-accuracy", type=float, default=0.9, help="time-to-accuracy target (default: 0.9)")
    p.add_argument("--data-dir", default=common.default_data_dir(existing_only=True), help="data folder (default: ../shared/data when present)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per rank (default: 1, so W ranks use W cores)")
    p.add_argument("--no-accelerate", action="store_true", help="skip the HF Accelerate peer")
    p.add_argument("--reps", type=int, default=3, help="where the Accelerate peer runs: ours and it take turns this many times (order alternated); "
                   "the row keeps each one's median run and the median of the per-turn ratios (default: 3)")
    p.add_argument("--out", default=str(common.RESULTS / "ddp_study.json"), help="output JSON (PNG beside it)")
    args = p.parse_args(argv)
    import torch

    cpus = common.usable_cpus()
    has_cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp_study_") as tmp:
        work = Path(tmp)
        for bs in [int(b) for b in common.split_names(args.batch_sizes)]:
            for precision in common.split_names(args.precisions):
                for backend in common.split_names(args.backends):
                    for world in [int(w) for w in common.split_names(args.worlds)]:
                        cfg = {"batch_size": bs, "precision": precision, "backend": backend, "world": world,
                               "threads": args.threads_per_rank, "model": args.model, "dataset": args.dataset,
                               "epochs": args.epochs, "lr": args.lr, "test_limit": args.test_limit, "train_limit": args.train_limit,
                               "target": args.target_accuracy, "data_dir": args.data_dir}
                        row = {k: cfg[k] for k in ("batch_size", "precision", "backend", "world", "threads")}
                        if backend == "nccl" and not has_cuda:
                            rows.append({**row, "skipped": "nccl needs CUDA GPUs; this machine has none"})
                            continue
                        peer = not args.no_accelerate and backend == "gloo" and str(bs) in common.split_names(args.accelerate_batch_sizes)
                        runs: dict[str, list[dict]] = {"ours": [], "accelerate": []}
                        for rep in range(max(1, args.reps) if peer else 1):
                            # turns in alternating order: a slow spell of the shared machine hits both
                            order = [("ours", ours), ("accelerate", accelerate_peer)] if peer else [("ours", ours)]
                            for name, run in order[:: -1 if rep % 2 else 1]:
                                common.log(f"{name} {row} turn {rep + 1}")
                                runs[name].append(run({**cfg, "rep": rep}, work))
                        for name, done in runs.items():
                            if done:
                                row[name] = _median_run(done)
                        if peer:
                            ratios = [o["samples_per_s"] / a["samples_per_s"] for o, a in zip(runs["ours"], runs["accelerate"], strict=True)
                                      if o.get("samples_per_s") and a.get("samples_per_s")]
                            if ratios:
                                row["ours_over_accelerate_turns"] = [round(r, 3) for r in ratios]
                                row["ours_over_accelerate"] = sorted(ratios)[len(ratios) // 2]
                        rows.append(row)
                        common.log(json.dumps({k: v for k, v in row.items() if k not in ("ours", "accelerate")} |
                                              {s: round(row[s].get("samples_per_s") or 0, 1) for s in ("ours", "accelerate") if s in row}))
    for row in rows:
        for system in ("ours", "accelerate"):
            r = row.get(system)
            base = next((x.get(system) for x in rows if x.get(system) and x["world"] == 1 and x["batch_size"] == row["batch_size"]
                         and x["precision"] == row["precision"] and x["backend"] == row["backend"]), None)
            if r and base and r.get("samples_per_s") and base.get("samples_per_s"):
                r["scaling_efficiency"] = r["samples_per_s"] / (row["world"] * base["samples_per_s"])
    result = {**common.run_stamp(), "platform": common.platform_info(), "usable_cpus": cpus, "cuda": has_cuda,
              "packages": common.package_versions(["torch", "accelerate"]), "loadavg_end": common.loadavgs(),
              "config": vars(args), "rows": rows}
    out = common.write_json(args.out, result)
    plot(rows, out.with_suffix(".png"))
    for row in rows:
        if "skipped" in row:
            print(f"b={row['batch_size']:>4} {row['precision']} {row['backend']} W={row['world']}: skipped ({row['skipped']})")
            continue
        o, a = row.get("ours", {}), row.get("accelerate")
        peer = (f"accelerate {a.get('samples_per_s') or 0:7.1f}; ours/accelerate {row['ours_over_accelerate']:.2f} "
                f"(median of turns {row['ours_over_accelerate_turns']})") if a and "ours_over_accelerate" in row else "accelerate not run"
        print(f"b={row['batch_size']:>4} {row['precision']} {row['backend']} W={row['world']}: ours {o.get('samples_per_s') or 0:7.1f} "
              f"samples/s (eff {o.get('scaling_efficiency', float('nan')):.2f}), {peer}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (every turn's figure kept in ``samples_per_s_turns``)."""
    ok = sorted((r for r in runs if r.get("samples_per_s")), key=lambda r: r["samples_per_s"])
    if not ok:
        return runs[0]
    return {**ok[len(ok) // 2], "samples_per_s_turns": [round(r.get("samples_per_s") or 0, 1) for r in runs]}


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    done = [r for r in rows if "ours" in r and r["ours"].get("samples_per_s")]
    labels = [f"b{r['batch_size']}\n{r['precision']}\nW={r['world']}" for r in done]
    x = range(len(done))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(done) + 4), 4.5))
    ax.bar([i - 0.2 for i in x], [r["ours"]["samples_per_s"] for r in done], 0.4, label="mlsyskit train (DDP)")
    ax.bar([i + 0.2 for i in x], [r.get("accelerate", {}).get("samples_per_s") or 0 for r in done], 0.4, label="HF Accelerate")
    ax.set(xticks=list(x), ylabel="samples/s", title="training throughput (gloo, CPU)")
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=8)
    ax2.bar(list(x), [r["ours"].get("peak_mem_mb_per_rank") or 0 for r in done], color="tab:green")
    ax2.set(xticks=list(x), ylabel="MiB", title="peak memory per rank (largest rank, RSS)")
    ax2.set_xticklabels(labels, fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
