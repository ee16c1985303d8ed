"""Where a batch-1 decode token's time goes in mlsyskit's engine (native quantized GGUF).

The fused decode layer (csrc/decode.c) times its phases when asked: the q|k|v, o, gate|up and
down products, attention (RoPE, KV write, paged attention) and the rest (norms, SwiGLU,
residual adds); the output projection (lm_head), the embedding lookup and sampling are timed
around their calls; what remains of the step is the engine's Python (scheduler, detokenizer,
bookkeeping). Each product's achieved bandwidth (the bytes of its weights per token / its time)
is set against the machine's memory bandwidth, measured here with numpy (one thread) and torch
(all threads) reading a 512 MiB array: a product near that bandwidth is memory-bound, one far
below it is compute- or overhead-bound.

With ``--together``: where the time of engine_throughput.py's 64-requests-at-once workload goes
instead (the same prompts and lengths): per engine step, the scheduler, the step's tensors, the
layers (prefill steps and decode steps apart), the logits and sampling; the default engine
next to one whose fused decode steps stop at 31 rows (the limit before this profile), the two
alternating, ``--together-reps`` runs each.

Run:  .venv/bin/python benchmarks/engine_profile.py [--threads 1,2] [--tokens 128] [--together]
Writes benchmarks/results/engine_profile.json (engine_profile_together.json with --together).
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


def profile_together(llm_factory: Any, reqs: list[Any], fused_rows: int | None) -> dict[str, Any]:
    """All of ``reqs`` (prompt ids, max_tokens) at once through a fresh engine, greedy, EOS
    ignored; seconds per part of the steps (see the module docstring)."""
    from collections import defaultdict

    from mlsyskit.engine import SamplingParams
    from mlsyskit.engine.fused_decode import FusedDecoder

    llm = llm_factory()
    eng, runner = llm.engine, llm.engine.runner
    if fused_rows is not None and runner.fused is not None:
        runner.fused = FusedDecoder(eng.model, eng.kv_cache, max_rows=fused_rows)
    llm.generate([reqs[0][0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm
    secs: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def timed(obj: Any, name: str, key: Any) -> None:
        fn = getattr(obj, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                kind = key(*a) if callable(key) else key
                secs[kind] += time.perf_counter() - t
                counts[kind] += 1
        setattr(obj, name, wrapper)

    timed(eng.scheduler, "schedule", "schedule")
    timed(runner, "inputs", "inputs")
    timed(runner, "hidden", lambda inputs, *_: "layers_prefill" if inputs.meta.prefills else "layers_decode")
    timed(runner, "_logits", "logits")
    timed(runner, "_sample", "sample")
    for ids, n in reqs:
        eng.add_request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    load0, steps0 = common.loadavg(), eng.num_steps
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    wall = time.perf_counter() - t0
    parts = {k: round(v, 3) for k, v in secs.items()}
    parts["engine_python"] = round(wall - sum(secs.values()), 3)
    tokens = sum(n for _, n in reqs)
    return {"fused_max_rows": runner.fused.max_rows if runner.fused is not None else None,
            "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 2), "steps": eng.num_steps - steps0,
            "seconds_by_part": parts, "calls": dict(counts), "loadavg_1m": [load0, common.loadavg()]}


def together_main(args: argparse.Namespace) -> int:
    import torch

    import engine_throughput as et
    from mlsyskit.engine import LLM, load_checkpoint
    from mlsyskit.models.checkpoint import default_model_path

    threads = int(common.split_names(args.threads)[-1])
    torch.set_num_threads(threads)
    load0 = common.loadavgs()
    native = load_checkpoint(args.model or default_model_path(), native=True)
    wargs = et.build_parser().parse_args([])
    text, source = et.load_text(wargs.data_dir)
    wl = et.make_workload(wargs, native.tokenizer.encode, text)
    reqs = [(r.prompt_ids, r.max_tokens) for r in wl["requests"]]
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "fused_max_rows_31": []}
    for rep in range(args.together_reps):
        for name in common.rotated(list(runs), rep):
            r = profile_together(lambda: LLM(native), reqs, None if name == "default" else 31)
            runs[name].append(r)
            print(f"{name}: {r['tok_s']} tok/s, wall {r['wall_s']} s:", r["seconds_by_part"], flush=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    report = {
        "benchmark": "engine_profile_together",
        **common.run_stamp(),
        "host": {**common.platform_info(), "cpu": common.cpu_model(), "cpus": common.usable_cpus(),
                 "threads": threads, "loadavg_start": load0, "loadavg_end": common.loadavgs()},
        "workload": {"source": source, "requests": len(reqs), "prompt_tokens": sum(len(i) for i, _ in reqs),
                     "output_tokens": sum(n for _, n in reqs), "as": "engine_throughput.py's together phase"},
        "runs": runs,
        "best_wall_s": {k: v["wall_s"] for k, v in best.items()},
        "speedup_default_over_31_rows": round(best["fused_max_rows_31"]["wall_s"] / best["default"]["wall_s"], 3),
    }
    out = common.write_json(args.out if args.out != str(DEFAULT_OUT) else common.RESULTS / "engine_profile_together.json", report)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="thread counts to profile, comma-separated (default: 1,2)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per profile (default: 128)")
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--together", action="store_true", help="profile the 64-requests-at-once workload instead (see above)")
    p.add_argument("--together-reps", type=int, default=2, help="--together: runs of each engine, alternating (default: 2)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.together:
        return together_main(args)
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
