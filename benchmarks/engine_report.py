"""The bookkeeping of engine_throughput.py: per-run summaries, the one-at-a-time replay of a
Poisson stream, greedy-output comparison, the goals, the table and the chart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import common

# Goals from the issue (12): ratios measured in the same run.
GOAL_BATCH1_VS_LLAMACPP = 1.2
GOAL_PREFILL_VS_LLAMACPP = 1.0
GOAL_THROUGHPUT_VS_LLAMACPP = 8.0  # llama.cpp serving the requests one by one
GOAL_THROUGHPUT_VS_HF_BATCH = 3.0  # transformers generate() with all prompts in one padded batch
GOAL_THROUGHPUT_VS_STATIC = 1.0
GOAL_LOAD_S = 1.0
GOAL_PERPLEXITY_REL = 0.005  # ours native vs llama.cpp on the same text


def summarize(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """records: per request {arrival, first, finish (s since the run's t0), tokens}."""
    ttft = [r["first"] - r["arrival"] for r in records]
    e2e = [r["finish"] - r["arrival"] for r in records]
    tokens = sum(len(r["tokens"]) for r in records)
    return {
        "requests": len(records),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_s": common.percentile(ttft, 50),
        "ttft_p99_s": common.percentile(ttft, 99),
        "ttft_mean_s": round(float(np.mean(ttft)), 4) if ttft else None,
        "e2e_p50_s": common.percentile(e2e, 50),
        "e2e_p99_s": common.percentile(e2e, 99),
        "per_request": [
            {"arrival_s": round(r["arrival"], 4), "ttft_s": round(r["first"] - r["arrival"], 4),
             "e2e_s": round(r["finish"] - r["arrival"], 4), "new_tokens": len(r["tokens"])}
            for r in records
        ],
    }


def replay_fifo(together: dict[str, Any], arrivals: np.ndarray) -> dict[str, Any]:
    """One-at-a-time FIFO server on new arrivals, from the per-request service times measured
    in the all-together run (exact for a single-sequence server whose service time does not
    depend on when a request arrives). Used for the systems named in --replay-poisson."""
    per = together["per_request"]
    # in the together run request i started when i-1 finished: service_i = finish_i - finish_{i-1}
    finishes = [p["e2e_s"] for p in per]
    firsts = [p["ttft_s"] for p in per]
    records, free = [], 0.0
    prev_finish = 0.0
    for i in range(len(per)):
        service = finishes[i] - prev_finish
        to_first = firsts[i] - prev_finish
        prev_finish = finishes[i]
        start = max(float(arrivals[i]), free)
        records.append({"i": i, "arrival": float(arrivals[i]), "first": start + to_first,
                        "finish": start + service, "tokens": [0] * per[i]["new_tokens"]})
        free = start + service
    res = summarize(records, max(r["finish"] for r in records))
    res["replayed"] = True
    return res


# --------------------------------------------------------------------------------------
# Correctness: greedy outputs compared token by token
# --------------------------------------------------------------------------------------


def compare_tokens(a: list[list[int]], b: list[list[int]], decode: Callable[[list[int]], str]) -> dict[str, Any]:
    firsts = []
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        d = next((j for j in range(n) if x[j] != y[j]), None if len(x) == len(y) else n)
        firsts.append(d)
    mism = [d for d in firsts if d is not None]
    text_match = sum(decode(x) == decode(y) for x, y in zip(a, b, strict=True))
    return {
        "compared": len(a),
        "greedy_match": len(a) - len(mism),
        "text_match": int(text_match),
        "first_divergence": firsts,  # None = identical; else the index of the first different token
        "earliest_divergence": min(mism) if mism else None,
        "median_divergence": float(np.median(mism)) if mism else None,
        "tokens_compared": int(sum(min(len(x), len(y)) for x, y in zip(a, b, strict=True))),
    }


def greedy_checks(
    results: dict[str, dict[str, Any]],
    rounds: list[dict[str, dict[str, Any]]],
    systems: dict[str, Any],
    decode: Callable[[list[int]], str],
) -> dict[str, Any]:
    """Greedy outputs compared token by token across systems and phases (needs the "tokens"
    lists still in ``results``)."""
    checks: dict[str, Any] = {}

    def toks(n: str, phase: str) -> list[list[int]] | None:
        return results.get(n, {}).get(phase, {}).get("tokens")

    pairs = [
        ("ours_fp32_vs_transformers_together (same fp32 weights)", ("ours_fp32", "together"), ("hf", "together")),
        ("ours_fp32_vs_transformers_batch1", ("ours_fp32", "hf"), None),
        ("ours_native_vs_ours_fp32_together (int8 activations: near ties can flip)", ("ours", "together"), ("ours_fp32", "together")),
        ("ours_vs_ours_static_together (native: batch shapes round differently)", ("ours", "together"), ("ours_static", "together")),
        ("ours_together_vs_ours_poisson", ("ours", "together"), ("ours", "poisson")),
        ("ours_vs_ours_naive_reduced", ("ours", "reduced"), ("ours_naive", "reduced")),
        ("transformers_vs_transformers_batched", ("hf", "together"), ("hf_batch", "together")),
        ("ours_vs_llamacpp_together (both Q4_1, different kernels)", ("ours", "together"), ("llamacpp", "together")),
    ]
    for key, a, b in pairs:
        if b is None:
            x, y = a
            if x in rounds[0] and y in rounds[0]:
                checks[key] = compare_tokens([rounds[0][x]["tokens"]], [rounds[0][y]["tokens"]], decode)
            continue
        ta, tb = toks(*a), toks(*b)
        if ta and tb:
            checks[key] = compare_tokens(ta, tb, decode)
    return checks


def _goal(ratio: float, goal: float, **extra: Any) -> dict[str, Any]:
    return {"goal": f">= {goal}", "ratio": round(ratio, 3), "met": ratio >= goal, **extra}


def compute_goals(
    results: dict[str, dict[str, Any]],
    rounds: list[dict[str, dict[str, Any]]],
    prefill_rounds: list[dict[str, dict[str, Any]]],
    perplexity: dict[str, Any],
) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    for key, rs, field, goal in (("batch1_decode_ours_over_llamacpp", rounds, "decode_tok_s", GOAL_BATCH1_VS_LLAMACPP),
                                 ("prefill_ours_over_llamacpp", prefill_rounds, "prefill_tok_s", GOAL_PREFILL_VS_LLAMACPP)):
        per = [r["ours"][field] / r["llamacpp"][field] for r in rs if "ours" in r and "llamacpp" in r and r["llamacpp"][field]]
        if per:
            goals[key] = _goal(float(np.median(per)), goal, per_round=[round(x, 3) for x in per])
    ours_t = results.get("ours", {}).get("together", {}).get("throughput_tok_s")
    for key, other, goal in (("throughput_ours_over_llamacpp_one_by_one", "llamacpp", GOAL_THROUGHPUT_VS_LLAMACPP),
                             ("throughput_ours_over_transformers_batched", "hf_batch", GOAL_THROUGHPUT_VS_HF_BATCH),
                             ("throughput_ours_over_ours_static", "ours_static", GOAL_THROUGHPUT_VS_STATIC)):
        o = results.get(other, {}).get("together", {}).get("throughput_tok_s")
        if ours_t and o:
            g = _goal(ours_t / o, goal, ours_tok_s=ours_t, **{f"{other}_tok_s": o})
            po = results.get(other, {}).get("poisson", {}).get("throughput_tok_s")
            pu = results.get("ours", {}).get("poisson", {}).get("throughput_tok_s")
            if po and pu:
                g["poisson_ratio (info: bounded by the arrival rate)"] = round(pu / po, 3)
            goals[key] = g
    load = results.get("ours", {}).get("load", {}).get("load_s_median")
    if load is not None:
        goals["load_s_ours"] = {"goal": f"< {GOAL_LOAD_S} s", "ratio": load, "met": load < GOAL_LOAD_S}
    if "ours" in perplexity and "llamacpp" in perplexity:
        a, b = perplexity["ours"]["perplexity"], perplexity["llamacpp"]["perplexity"]
        rel = abs(a - b) / b
        goals["perplexity_ours_vs_llamacpp"] = {"goal": f"within {GOAL_PERPLEXITY_REL:.1%}", "ratio": round(a / b, 4),
                                                "relative_difference": round(rel, 4), "met": rel <= GOAL_PERPLEXITY_REL}
    # information: native against the fp32 reference, and against transformers one by one
    for field, key in (("decode_tok_s", "info_batch1_decode_ours_over_ours_fp32"),):
        per = [r["ours"][field] / r["ours_fp32"][field] for r in rounds if "ours" in r and "ours_fp32" in r and r["ours_fp32"][field]]
        if per:
            goals[key] = round(float(np.median(per)), 3)
    for n in ("ours_fp32", "hf"):
        o = results.get(n, {}).get("together", {}).get("throughput_tok_s")
        if ours_t and o:
            goals[f"info_throughput_ours_over_{n}"] = round(ours_t / o, 3)
    red_o = results.get("ours", {}).get("reduced", {}).get("throughput_tok_s")
    red_n = results.get("ours_naive", {}).get("reduced", {}).get("throughput_tok_s")
    if red_o and red_n:
        goals["info_reduced_throughput_ours_over_kv_cache_false"] = round(red_o / red_n, 3)
    return goals


def print_table(report: dict[str, Any]) -> None:
    res = report["systems"]
    print("\nsystem        load s  prefill  batch1 dec  | together: tok/s  TTFT p50   p99   | poisson: tok/s  TTFT p50    p99")
    for n, r in res.items():
        if r.get("skipped"):
            print(f"{n:12s}  skipped: {r['reason'][:80]}")
            continue
        t = r.get("together") or r.get("reduced") or {}
        p = r.get("poisson", {})

        def f(x: Any, w: int, d: int = 1) -> str:
            return f"{x:{w}.{d}f}" if isinstance(x, int | float) else f"{'-':>{w}}"

        tag = " (reduced)" if "together" not in r and "reduced" in r else ""
        print(f"{n:12s} {f(r.get('load', {}).get('load_s_median'), 6, 2)} {f(r.get('prefill', {}).get('prefill_tok_s_median'), 8)}"
              f" {f(r.get('decode_tok_s_batch1'), 9)}   | {f(t.get('throughput_tok_s'), 13)} "
              f"{f(t.get('ttft_p50_s'), 8, 2)} {f(t.get('ttft_p99_s'), 6, 2)}   | {f(p.get('throughput_tok_s'), 12)} "
              f"{f(p.get('ttft_p50_s'), 9, 2)} {f(p.get('ttft_p99_s'), 6, 2)}{tag}")
    print("\ngoals:")
    for k, g in report["goals"].items():
        if isinstance(g, dict):
            print(f"  {k}: ratio {g['ratio']} (goal {g['goal']}) -> {'MET' if g['met'] else 'MISSED'}")
        else:
            print(f"  {k}: {g}")
    c = report["correctness"]
    for k, v in c.items():
        if isinstance(v, dict) and "greedy_match" in v:
            print(f"  greedy {k}: {v['greedy_match']}/{v['compared']} identical, earliest divergence {v['earliest_divergence']}")


def plot(results: dict[str, dict[str, Any]], goals: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    names = [n for n, r in results.items() if not r.get("skipped")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"ours": "tab:green", "ours_fp32": "tab:cyan", "ours_static": "tab:olive", "ours_naive": "tab:gray",
              "hf": "tab:orange", "hf_batch": "tab:brown", "llamacpp": "tab:blue"}
    ax = axes[0]
    vals = [results[n].get("decode_tok_s_batch1") or 0 for n in names]
    ax.bar(names, vals, color=[colors[n] for n in names])
    ax.set_title("batch-1 decode (tokens/s)")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax = axes[1]
    x = np.arange(len(names))
    for off, phase in ((-0.2, "together"), (0.2, "poisson")):
        v = [results[n].get(phase, results[n].get("reduced", {}) if phase == "together" else {}).get("throughput_tok_s") or 0
             for n in names]
        ax.bar(x + off, v, 0.4, label=phase, color=[colors[n] for n in names], alpha=1.0 if phase == "together" else 0.55)
        for i, y in enumerate(v):
            if y:
                ax.text(i + off, y, f"{y:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_title("throughput (tokens/s): solid = all together, light = Poisson\n(ours_naive: its reduced workload)", fontsize=9)
    ax = axes[2]
    for k, (phase, q) in enumerate((("together", 50), ("together", 99), ("poisson", 50), ("poisson", 99))):
        v = [results[n].get(phase, {}).get(f"ttft_p{q}_s") or np.nan for n in names]
        ax.bar(x - 0.3 + 0.2 * k, v, 0.2, label=f"{phase} p{q}")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_title("time to first token (s, log)")
    ax.legend(fontsize=7)
    for a in axes:
        a.tick_params(axis="x", labelrotation=30, labelsize=8)
    g = [f"{k.split('_', 1)[1] if k.startswith('info_') else k}: {v['ratio'] if isinstance(v, dict) else v}"
         for k, v in goals.items()]
    half = (len(g) + 1) // 2
    fig.suptitle("SmolLM2-135M, 2 threads. " + "; ".join(g[:half]) + "\n" + "; ".join(g[half:]), fontsize=8)
    common.save_figure(fig, path)
