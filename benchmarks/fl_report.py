"""The parent side of fl_vs_flower.py: per-system summaries, the ratios and goals, the
roofline (how close each system runs to this CPU's FP32 peak), the chart and the table."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

import common
from fl_peers import BATCH_SIZE, CLIENTS, CNN_SYSTEMS, FRACTION, LOCAL_EPOCHS, MODEL

# Goals from the issue (mlsyskit relative to the others).
GOAL_TRAIN_VS_FLOWER = 4.0
GOAL_TRAIN_VS_PLAIN = 1.8
GOAL_ROUND_VS_FLOWER = 4.0
GOAL_MEMORY_VS_FLOWER = 0.5
# Accuracy "equal within noise": |difference| <= max(floor, NOISE_SIGMAS * std of the final
# accuracy over --noise-reps reruns of the plain loop with other shuffles and client samples).
ACC_TOL_FLOOR = 0.005  # ~1.5 binomial standard errors of a 10k-image test accuracy
ACC_TOL_NO_NOISE = 0.01  # used when the noise was not measured (--noise-reps 0)
NOISE_SIGMAS = 3.0


def _stats(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    timed = vals[1:] if len(vals) > 1 else vals
    if not timed:
        return {}
    return {
        f"{key}_mean": statistics.fmean(timed),
        f"{key}_median": statistics.median(timed),
        f"{key}_round1": vals[0] if vals else None,
        f"{key}_per_round": vals,
    }


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    rows = res.get("rounds") or []
    if not rows:
        return res
    for key in ("train_s", "round_s", "eval_s", "round_period_s"):
        res.update(_stats(rows, key))
    res["final_accuracy"] = rows[-1]["test_accuracy"]
    res["accuracy_per_round"] = [r["test_accuracy"] for r in rows]
    res["clients_per_round"] = [r.get("clients") for r in rows]
    return res


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def compare(systems: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    fl, pl, ml = (systems.get(k, {}) for k in ("flower", "plain", "mlsyskit"))
    ratios = {
        "train_speedup_vs_flower": _ratio(fl.get("train_s_mean"), ml.get("train_s_mean")),
        "train_speedup_vs_plain": _ratio(pl.get("train_s_mean"), ml.get("train_s_mean")),
        "round_speedup_vs_flower": _ratio(fl.get("round_s_mean"), ml.get("round_s_mean")),
        "round_speedup_vs_plain": _ratio(pl.get("round_s_mean"), ml.get("round_s_mean")),
        "memory_ratio_vs_flower": _ratio(ml.get("peak_rss_mib"), fl.get("peak_rss_mib")),
        # Extra views of the same runs (not the goals' definitions):
        "train_speedup_vs_flower_median": _ratio(fl.get("train_s_median"), ml.get("train_s_median")),
        "train_speedup_vs_plain_median": _ratio(pl.get("train_s_median"), ml.get("train_s_median")),
        "round_speedup_vs_flower_median": _ratio(fl.get("round_s_median"), ml.get("round_s_median")),
        "round_speedup_vs_flower_incl_mlsyskit_checkpoint": _ratio(
            fl.get("round_s_mean"), ml.get("round_period_s_mean")
        ),
        "memory_ratio_vs_flower_pss": _ratio(ml.get("peak_pss_mib"), fl.get("peak_pss_mib")),
        "memory_ratio_vs_plain": _ratio(ml.get("peak_rss_mib"), pl.get("peak_rss_mib")),
        "cpu_seconds_ratio_vs_flower": _ratio(ml.get("cpu_s_tree"), fl.get("cpu_s_tree")),
    }
    ratios["definitions"] = (
        "speedup = other system's mean seconds per round / mlsyskit's (rounds 2..R; round 1 is "
        "warm-up and skipped); train = training phase (mlsyskit: metrics train_s; plain: local "
        "training of the 10 clients; flower: configure_train to the end of aggregate_train, so "
        "it includes message passing, Ray dispatch and aggregation); round = whole round incl. "
        "test evaluation (mlsyskit: metrics wall_s, which excludes the checkpoint it writes "
        "between rounds; *_incl_mlsyskit_checkpoint uses the measured period between round "
        "starts instead); memory_ratio = mlsyskit peak summed RSS / flower's"
    )

    noise = systems.get("noise", {})
    std = noise.get("std")
    tol = max(ACC_TOL_FLOOR, NOISE_SIGMAS * std) if std is not None else ACC_TOL_NO_NOISE
    acc_ml = ml.get("final_accuracy")
    diffs = {
        k: (acc_ml - s["final_accuracy"]) if acc_ml is not None and s.get("final_accuracy") is not None else None
        for k, s in (("flower", fl), ("plain", pl))
    }
    known = [d for d in diffs.values() if d is not None]

    def goal(name: str, value: float | None, op: str, target: float, definition: str) -> dict[str, Any]:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        return {"goal": name, "value": value, "target": f"{op} {target}", "met": met, "definition": definition}

    goals = [
        goal("training phase >= 4x Flower", ratios["train_speedup_vs_flower"], ">=", GOAL_TRAIN_VS_FLOWER,
             "train_speedup_vs_flower"),
        goal("training phase >= 1.8x plain PyTorch", ratios["train_speedup_vs_plain"], ">=", GOAL_TRAIN_VS_PLAIN,
             "train_speedup_vs_plain"),
        goal("whole round >= 4x Flower", ratios["round_speedup_vs_flower"], ">=", GOAL_ROUND_VS_FLOWER,
             "round_speedup_vs_flower"),
        goal("peak memory <= 0.5x Flower", ratios["memory_ratio_vs_flower"], "<=", GOAL_MEMORY_VS_FLOWER,
             "memory_ratio_vs_flower (peak summed RSS of the process tree)"),
        {
            "goal": "final accuracy equal within noise",
            "value": {f"mlsyskit_minus_{k}": d for k, d in diffs.items()},
            "target": f"|difference| <= {tol:.4f}",
            "met": (all(abs(d) <= tol for d in known) if len(known) == len(diffs) else None),
            "definition": (
                f"tolerance = max({ACC_TOL_FLOOR}, {NOISE_SIGMAS:g} x std of the final accuracy over "
                f"{len(noise.get('final_accuracies', []))} reruns of the plain loop with other shuffles "
                f"and client samples (std={std}))"
                if std is not None
                else f"tolerance fixed at {ACC_TOL_NO_NOISE} (noise not measured: --noise-reps < 2)"
            ),
        },
    ]
    return {"ratios": ratios, "goals": goals, "accuracy_tolerance": tol}


def roofline(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How close each system runs to this CPU's FP32 peak, and what the speed goals demand.

    FLOPs come from torch's FlopCounterMode on the CNN; the peak is a 2048^3 SGEMM with
    all threads (measured here, after every timed run has finished).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from mlsyskit.models import build_model

    model = build_model(MODEL)
    x, y = torch.randn(BATCH_SIZE, 1, 28, 28), torch.randint(0, 10, (BATCH_SIZE,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train_per_sample = fc.get_total_flops() / BATCH_SIZE
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    fwd_per_sample = fc.get_total_flops() / BATCH_SIZE
    train_n = next((v["train_size"] for v in systems.values() if v.get("train_size")), 5000)
    samples = max(int(round(FRACTION * CLIENTS)), 1) * (train_n // CLIENTS) * LOCAL_EPOCHS
    test_n = next((v["test_size"] for v in systems.values() if v.get("test_size")), 10000)
    train_flop, eval_flop = train_per_sample * samples, fwd_per_sample * test_n

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm-up
    best = min(common.timed(torch.matmul, a, b)[1] for _ in range(5))
    peak = 2 * 2048**3 / best

    def gflops(flop: float, sec: float | None) -> float | None:
        return None if not sec else flop / sec / 1e9

    achieved = {
        n: {
            "train_gflops": gflops(train_flop, systems[n].get("train_s_mean")),
            "eval_gflops": gflops(eval_flop, systems[n].get("eval_s_mean")),
        }
        for n in CNN_SYSTEMS
        if n in systems and systems[n].get("train_s_mean")
    }
    fl = systems.get("flower", {})
    need: dict[str, Any] = {}
    if fl.get("train_s_mean"):
        t = fl["train_s_mean"] / GOAL_TRAIN_VS_FLOWER
        need["train_4x_flower"] = {"max_train_s": t, "needs_gflops": train_flop / t / 1e9}
    if systems.get("plain", {}).get("train_s_mean"):
        t = systems["plain"]["train_s_mean"] / GOAL_TRAIN_VS_PLAIN
        need["train_1.8x_plain"] = {"max_train_s": t, "needs_gflops": train_flop / t / 1e9}
    if fl.get("round_s_mean"):
        t = fl["round_s_mean"] / GOAL_ROUND_VS_FLOWER
        need["round_4x_flower"] = {"max_round_s": t, "needs_gflops": (train_flop + eval_flop) / t / 1e9}
    for v in need.values():
        v["fraction_of_sgemm_peak"] = v["needs_gflops"] * 1e9 / peak
    return {
        "train_flop_per_round": train_flop,
        "eval_flop_per_round": eval_flop,
        "train_samples_per_round": samples,
        "test_images": test_n,
        "sgemm_peak_gflops": peak / 1e9,
        "sgemm_threads": torch.get_num_threads(),
        "achieved": achieved,
        "goals_need": need,
        "note": "FLOPs from torch.utils.flop_counter (forward+backward per training sample, forward "
        "per test image); the same exact FP32 FedAvg computation is required of every system, so "
        "a goal that needs more than ~100% of the SGEMM peak cannot be met by any implementation "
        "of this experiment on this machine",
    }


def plot(systems: dict[str, dict[str, Any]], path: Path, rounds: int) -> None:
    plt = common.pyplot()
    names = [n for n in CNN_SYSTEMS if systems.get(n, {}).get("round_s_mean") is not None]
    if not names:
        return
    x = np.arange(len(names))
    train = [systems[n]["train_s_mean"] for n in names]
    whole = [systems[n]["round_s_mean"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    b1 = ax.bar(x - 0.2, train, 0.4, label="training phase")
    b2 = ax.bar(x + 0.2, whole, 0.4, label="whole round (incl. test eval)")
    ax.bar_label(b1, fmt="%.2f", fontsize=8)
    ax.bar_label(b2, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("seconds per round")
    skipped = f"rounds 2-{rounds}, round 1 skipped" if rounds > 1 else "1 round"
    ax.set_title(f"FedAvg MNIST-5k CNN, 10 of 100 clients/round ({skipped})", fontsize=9)
    ax.set_ylim(0, 1.25 * max(whole))
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    common.save_figure(fig, path)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict[str, Any]) -> None:
    systems = report["systems"]
    print()
    print(f"FedAvg MNIST-5k CNN, {report['experiment']['rounds']} rounds (means/medians over rounds 2..R)")
    head = f"{'system':9} {'train s/rnd':>11} {'(median)':>9} {'round s/rnd':>11} {'(median)':>9} {'eval s':>7} {'peak RSS MiB':>12} {'final acc':>9} {'startup s':>9}"
    print(head)
    print("-" * len(head))
    for name in CNN_SYSTEMS:
        s = systems.get(name)
        if s is None:
            continue
        if "error" in s:
            print(f"{name:9} FAILED (exit {s['exit_code']}), see {s['log']}")
            continue
        print(
            f"{name:9} {_fmt(s.get('train_s_mean')):>11} {_fmt(s.get('train_s_median')):>9} "
            f"{_fmt(s.get('round_s_mean')):>11} {_fmt(s.get('round_s_median')):>9} "
            f"{_fmt(s.get('eval_s_mean')):>7} {_fmt(s.get('peak_rss_mib'), '.0f'):>12} "
            f"{_fmt(s.get('final_accuracy'), '.4f'):>9} {_fmt(s.get('startup_s'), '.1f'):>9}"
        )
    c = systems.get("classic")
    if c and "error" not in c:
        st, ml = c["student"], c["mlsyskit"]
        print(
            f"classic (MLP, 2 clients, 2 rounds, E=2): student loop {st['total_s']:.2f} s, acc "
            f"{st['final_accuracy']:.4f} | mlsyskit {ml['total_s']:.2f} s, acc {ml['final_accuracy']:.4f}"
        )
    elif c:
        print(f"classic FAILED (exit {c['exit_code']}), see {c['log']}")
    r = report.get("ratios", {})
    print(
        "ratios: train vs flower {} | train vs plain {} | round vs flower {} | round vs plain {} | "
        "memory vs flower {}".format(
            *(_fmt(r.get(k), ".2f") for k in (
                "train_speedup_vs_flower", "train_speedup_vs_plain", "round_speedup_vs_flower",
                "round_speedup_vs_plain", "memory_ratio_vs_flower"))
        )
    )
    rf = report.get("roofline")
    if rf:
        parts = [
            f"{n} train {_fmt(v['train_gflops'], '.0f')}/eval {_fmt(v['eval_gflops'], '.0f')}"
            for n, v in rf["achieved"].items()
        ]
        print(f"GFLOP/s achieved (SGEMM peak here {rf['sgemm_peak_gflops']:.0f}): " + "; ".join(parts))
        for name, v in rf["goals_need"].items():
            print(f"  {name} needs {v['needs_gflops']:.0f} GFLOP/s = {v['fraction_of_sgemm_peak']:.0%} of the SGEMM peak")
    for g in report.get("goals", []):
        v = g["value"]
        shown = ", ".join(f"{k}={_fmt(x, '+.4f')}" for k, x in v.items()) if isinstance(v, dict) else _fmt(v, ".2f")
        print(f"  goal {g['goal']:36} {shown:>34}  target {g['target']:<18} met={g['met']}")

