"""Where a batch-1 decode token's time goes in mlsyskit's engine (native quantized GGUF).

The fused decode layer (csrc/decode.c) times its phases when asked: the q|k|v, o, gate|up and
down products, attention (RoPE, KV write, paged attention) and the rest (norms, SwiGLU,
residual adds); the output projection (lm_head), the embedding lookup and sampling are timed
around their calls; what remains of the step is the engine's Python (scheduler, detokenizer,
bookkeeping). Each product's achieved bandwidth (the bytes of its weights per token / its time)
is set against the machine's memory bandwidth, measured here with numpy (one thread) and torch
(all threads) reading a 512 MiB array: a product near that bandwidth is memory-bound, one far
below it is compute- or overhead-bound.

Run:  .venv/bin/python benchmarks/engine_profile.py [--threads 1,2] [--tokens 128]
Writes benchmarks/results/engine_profile.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_OUT = common.RESULTS / "engine_profile.json"


def memory_bandwidth(threads: int, mib: int = 512) -> dict[str, Any]:
    """GB/s reading a freshly written array: numpy (one thread) and torch (``threads``)."""
    import torch

    a = np.ones(mib * 2**20 // 4, dtype=np.float32)  # written: no zero-page shortcut
    t = torch.from_numpy(a)
    out: dict[str, Any] = {"array_mib": mib}
    for name, fn, n in (("read_1_thread_gb_s", lambda: a.sum(), 1), (f"read_{threads}_threads_gb_s", lambda: t.sum(), threads)):
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        best = min(common.timed(fn)[1] for _ in range(5))
        torch.set_num_threads(saved)
        out[name] = round(a.nbytes / best / 1e9, 2)
    return out


def weight_bytes(llm: Any) -> dict[str, int]:
    """Bytes of each decode product's weights summed over the layers, and of the head."""
    model = llm.engine.model
    out = {"qkv": 0, "o_proj": 0, "gate_up": 0, "down": 0}
    for layer in model.layers:
        for key, m in (("qkv", layer.attn.qkv), ("o_proj", layer.attn.o_proj), ("gate_up", layer.ffn.gate_up), ("down", layer.ffn.down)):
            out[key] += m.nbytes
    out["lm_head"] = model.lm_head.nbytes
    return out


def profile_decode(llm: Any, prompt_ids: list[int], tokens: int, threads: int) -> dict[str, Any]:
    """Generate ``tokens`` greedy tokens after ``prompt_ids`` with ``threads`` threads and split
    the decode steps' wall time into phases (see the module docstring)."""
    import torch

    from mlsyskit.engine import SamplingParams
    from mlsyskit.engine import model_runner as mr
    from mlsyskit.quant import kernels

    torch.set_num_threads(threads)
    fused = llm.engine.runner.fused
    if fused is None:
        return {"skipped": "the model has no fused decode path (not a quantized Llama-family model)"}
    model = llm.engine.model
    timers = {"lm_head": 0.0, "embed": 0.0, "sample": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t
        return wrapper

    head_fwd, embed_fwd, sample = model.lm_head.forward, model.embed.forward, mr.sample
    eng = llm.engine
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt_ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm
    eng.add_request(prompt_ids, params)
    eng.step()  # the prefill, not profiled
    model.lm_head.forward, model.embed.forward, mr.sample = timed("lm_head", head_fwd), timed("embed", embed_fwd), timed("sample", sample)
    fused.profile(True)
    steps, load0 = 0, common.loadavg()
    t0 = time.perf_counter()
    try:
        while eng.has_unfinished():
            eng.step()
            steps += 1
    finally:
        wall = time.perf_counter() - t0
        model.lm_head.forward, model.embed.forward, mr.sample = head_fwd, embed_fwd, sample
        stats = list(fused.stats)
        fused.profile(False)
    per_token = {name: stats[i] / steps for i, name in enumerate(kernels.DECODE_PHASES)}
    per_token.update({k: v / steps for k, v in timers.items()})
    per_token["engine_python"] = wall / steps - sum(per_token.values())
    wb = weight_bytes(llm)
    gb_s = {k: round(wb[k] / per_token[k] / 1e9, 2) for k in wb if per_token.get(k)}
    return {
        "threads": threads,
        "thread_tuner_choice": fused.tuner.current,
        "steps": steps,
        "tok_s": round(steps / wall, 2),
        "ms_per_token": round(wall / steps * 1e3, 3),
        "ms_per_token_by_phase": {k: round(v * 1e3, 3) for k, v in per_token.items()},
        "share_by_phase": {k: round(v / (wall / steps), 3) for k, v in per_token.items()},
        "weight_mb_per_token": {k: round(v / 1e6, 2) for k, v in wb.items()},
        "achieved_gb_s": gb_s,
        "all_weights_gb_s": round(sum(wb.values()) / (wall / steps) / 1e9, 2),
        "loadavg_1m": [load0, common.loadavg()],
        "kernel_variant": kernels.variant(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="thread counts to profile, comma-separated (default: 1,2)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per profile (default: 128)")
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    from mlsyskit.engine import LLM

    load0 = common.loadavgs()
    llm = LLM(args.model)
    prompt = llm.tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.")
    threads = [int(t) for t in common.split_names(args.threads)]
    runs = [profile_decode(llm, prompt, args.tokens, t) for t in threads]
    report = {
        "benchmark": "engine_profile",
        **common.run_stamp(),
        "host": {**common.platform_info(), "cpus": common.usable_cpus(), "loadavg_start": load0, "loadavg_end": common.loadavgs()},
        "model": llm.checkpoint.source,
        "memory_bandwidth": memory_bandwidth(max(threads)),
        "profiles": runs,
    }
    out = common.write_json(args.out, report)
    for r in runs:
        print(f"{r['threads']} thread(s): {r['tok_s']} tok/s, {r['ms_per_token']} ms/token:",
              ", ".join(f"{k} {v}" for k, v in r["ms_per_token_by_phase"].items()))
        print("   achieved GB/s:", r["achieved_gb_s"], "all weights:", r["all_weights_gb_s"])
    print("memory bandwidth:", report["memory_bandwidth"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
