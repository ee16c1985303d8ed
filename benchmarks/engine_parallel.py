"""Tensor and pipeline parallel inference on this machine, and what the measured communication
means on paper for a GPU cluster.

Runs the embedded SmolLM2-135M (GGUF Q4_1, native kernels; ``--dtype float32`` for the reference
weights) as: one process with 1 and 2 threads (the baselines), 2 ranks x 1 thread tensor
parallel with the all-reduce over gloo sockets (the naive transport) and through shared memory,
2 ranks x 1 thread pipeline parallel. For each: prefill speed (one long prompt), decode
speed at batch 1 and batch 8, the bytes all-reduced (TP) or sent between stages (PP) per token,
and the share of rank 0's step time spent communicating (gloo over 127.0.0.1, including the wait
for the slower rank). Greedy outputs of every mode are compared with the 1-process run.

Then an analytic extrapolation (same formulas as the bytes counted here): a 7B Llama in fp16 on
4 GPUs, decode per token with TP=4 or PP=4, over NVLink and over 25 Gb/s Ethernet. No peer
system runs here: llama.cpp's multi-device split is for GPUs, and vLLM's TP needs GPUs.

    flock -x /tmp/quiet.lock .venv/bin/python benchmarks/engine_parallel.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_OUT = common.RESULTS / "engine_parallel.json"
MODES = {  # name: (torch threads, tensor parallel, pipeline parallel, TP all-reduce)
    "1 process x 1 thread": (1, 1, 1, "shm"),
    "1 process x 2 threads": (2, 1, 1, "shm"),
    "TP 2 ranks x 1 thread (gloo all-reduce)": (1, 2, 1, "gloo"),
    "TP 2 ranks x 1 thread (shm all-reduce)": (1, 2, 1, "shm"),
    "PP 2 ranks x 1 thread": (1, 1, 2, "shm"),
}


def _stats(llm: Any) -> dict[str, float]:
    group = getattr(llm.engine.runner, "group", None)
    return group.stats.as_dict() if group is not None else {}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after}


def _phase(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[dict[str, Any], list[list[int]]]:
    """Generate greedily; wall time, tokens computed, and rank 0's communication in that time."""
    from mlsyskit.engine import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    s0, steps0, tok0 = _stats(llm), llm.engine.num_steps, llm.engine.tokens_computed
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    comm = _delta(_stats(llm), s0)
    tokens = llm.engine.tokens_computed - tok0
    first = min(o.first_token_time for o in outs)
    last = max(o.finish_time for o in outs)
    generated = sum(len(o.token_ids) for o in outs)
    row: dict[str, Any] = {
        "wall_s": wall, "steps": llm.engine.num_steps - steps0, "tokens_computed": tokens,
        "prefill_tok_s": sum(len(p) for p in prompts) / (first - t0),
        "decode_tok_s": (generated - len(outs)) / (last - first) if generated > len(outs) else None,
    }
    if comm:
        comm_s = comm["allreduce_s"] + comm["p2p_s"] + comm["step_s"]
        row.update({
            "allreduce_bytes_per_token": comm["allreduce_bytes"] / tokens,
            "allreduce_calls_per_step": comm["allreduce_calls"] / row["steps"],
            "p2p_bytes_per_token": comm["p2p_bytes"] / tokens,
            "step_plan_bytes_per_step": comm["step_bytes"] / row["steps"],
            "comm_s": comm_s, "comm_share": comm_s / wall,
            "allreduce_us_per_call": 1e6 * comm["allreduce_s"] / comm["allreduce_calls"] if comm["allreduce_calls"] else None,
        })
    return row, [o.token_ids for o in outs]


def run_mode(name: str, model: str | None, dtype: str | None, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mlsyskit.engine import LLM

    threads, tp, pp, allreduce = MODES[name]
    torch.set_num_threads(threads)  # the workers take the parent's thread count
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, tensor_parallel_size=tp, pipeline_parallel_size=pp, parallel_allreduce=allreduce)
    start_s = time.perf_counter() - t0
    try:
        vocab = llm.engine.config.vocab_size
        long_prompt = [1] + [(7 * i + 11) % (vocab - 3) + 3 for i in range(args.prefill_tokens - 1)]
        batch = [[1] + [(13 * i + 31 * j + 5) % (vocab - 3) + 3 for i in range(24)] for j in range(args.batch)]
        _phase(llm, [long_prompt[:64]], 4)  # warm-up: first-call costs, thread tuner
        prefill, _ = _phase(llm, [long_prompt], 1)
        decode1, ids1 = _phase(llm, [batch[0]], args.decode_tokens)
        decode8, ids8 = _phase(llm, batch, args.decode_tokens)
    finally:
        llm.close()
    common.log(f"{name}: prefill {prefill['prefill_tok_s']:.0f} tok/s, decode b1 {decode1['decode_tok_s']:.1f}, "
               f"b{args.batch} {decode8['decode_tok_s']:.1f} tok/s")
    return {"threads": threads, "tensor_parallel": tp, "pipeline_parallel": pp, "allreduce": allreduce, "startup_s": start_s,
            "prefill": prefill, "decode_batch1": decode1, f"decode_batch{args.batch}": decode8,
            "greedy_ids": ids1 + ids8}


def extrapolate() -> dict[str, Any]:
    """A 7B Llama (fp16) on 4 GPUs: the latency of one token (batch 1) and the time of one
    decode step of 64 sequences (throughput), with TP=4 or PP=4, from memory-bound compute (a
    decode step reads every weight once) and an alpha-beta cost per message."""
    layers, dim, weight_bytes, n = 32, 4096, 13.5e9, 4
    hbm = 2.0e12  # bytes/s per GPU (A100 80 GB class)
    # (bandwidth per direction, latency per message hop)
    links = {"NVLink (300 GB/s, 2 us)": (300e9, 2e-6), "25 Gb/s Ethernet (3.1 GB/s, 50 us)": (3.1e9, 50e-6)}
    one = weight_bytes / hbm
    rows = []
    for batch in (1, 64):
        act = batch * dim * 2  # one fp16 hidden state per sequence
        for link, (bw, lat) in links.items():
            # TP: 2 ring all-reduces per layer: 2 (n-1) hops, each moving act / n
            allreduce = 2 * (n - 1) * (lat + act / n / bw)
            tp_comm = 2 * layers * allreduce
            tp = one / n + tp_comm
            if batch == 1:  # PP: one token crosses every stage in turn: no latency gain
                pp_comm = (n - 1) * (lat + act / bw)
                pp = one + pp_comm
            else:  # n micro-batches keep every stage busy; a hop overlaps the next one's compute
                pp_comm = lat + act / n / bw
                pp = one / n + pp_comm
            rows.append({
                "batch": batch, "link": link, "one_gpu_ms": 1e3 * one,
                "tp4_ms": 1e3 * tp, "tp4_comm_share": tp_comm / tp, "tp4_speedup": one / tp,
                "pp4_ms": 1e3 * pp, "pp4_comm_share": pp_comm / pp, "pp4_speedup": one / pp,
                "tp4_allreduce_bytes_per_token": 2 * layers * dim * 2,
                "pp4_p2p_bytes_per_token": (n - 1) * dim * 2,
            })
    return {
        "model": "Llama 7B fp16 (32 layers, dim 4096, 13.5 GB of weights), 4 GPUs at 2 TB/s HBM",
        "note": "batch 1: the latency of one token; batch 64: the time of one decode step of 64 "
                "sequences (throughput). TP cuts latency only where all-reduces are cheap; PP never "
                "cuts latency but multiplies throughput over any link (a hop carries one hidden state "
                "per sequence, once per stage, instead of 2 all-reduces per layer)",
        "rows": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    modes = report["modes"]
    names = list(modes)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    b = report["args"]["batch"]
    for ax, (key, field, title) in zip(axes[:2], [("prefill", "prefill_tok_s", "prefill tok/s"),
                                                  (f"decode_batch{b}", "decode_tok_s", f"decode tok/s, batch {b}")],
                                       strict=True):
        vals = [modes[m][key][field] for m in names]
        ax.bar(range(len(names)), vals, color=["#999", "#555", "#9ecae1", "#1f77b4", "#ff7f0e"][: len(names)])
        ax.set_xticks(range(len(names)), [m.replace(" x ", "\nx ").replace(" (", "\n(") for m in names], fontsize=7)
        ax.set_title(title)
        for i, m in enumerate(names):
            share = modes[m][key].get("comm_share")
            if share is not None:
                ax.text(i, vals[i], f"comm {100 * share:.0f}%", ha="center", va="bottom", fontsize=8)
    ax = axes[2]
    rows = report["extrapolation"]["rows"]
    labels = [f"b{r['batch']}\n{r['link'].split(' (')[0]}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tp4_speedup"] for r in rows], 0.4, label="TP=4")
    ax.bar([i + 0.2 for i in x], [r["pp4_speedup"] for r in rows], 0.4, label="PP=4")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_title("7B fp16, 4 GPUs, analytic: b1 latency / b64 throughput vs 1 GPU", fontsize=9)
    ax.legend()
    fig.suptitle(f"SmolLM2-135M parallel inference on {report['host'].get('cpu', 'this CPU')}", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF or HF dir (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default=None, help="None: native GGUF blocks; float32: the reference")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    load0 = common.loadavgs()
    modes = {}
    for name in common.split_names(args.modes):
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; use {', '.join(MODES)}")
        modes[name] = run_mode(name, args.model, args.dtype, args)
    base = next(iter(modes.values()))["greedy_ids"]
    for m in modes.values():
        m["greedy_equal_to_first_mode"] = m.pop("greedy_ids") == base
    b = f"decode_batch{args.batch}"
    ref = modes.get("1 process x 2 threads")
    ratios = {}
    if ref:
        for name, m in modes.items():
            ratios[name] = {k: m[k][f] / ref[k][f] for k, f in (("prefill", "prefill_tok_s"), ("decode_batch1", "decode_tok_s"), (b, "decode_tok_s"))}
    report = {
        **common.run_stamp(),
        "host": {**common.platform_info(), "cpu": common.cpu_model(), "cpus": common.usable_cpus(), "loadavg_start": load0, "loadavg_end": common.loadavgs()},
        "args": vars(args),
        "modes": modes,
        "speed_vs_1_process_2_threads": ratios,
        "extrapolation": extrapolate(),
    }
    out = common.write_json(args.out, report)
    plot(report, out.with_suffix(".png"))
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
