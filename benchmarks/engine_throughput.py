"""LLM serving on SmolLM2-135M: mlsyskit's engine (native quantized and fp32) vs its naive
modes, transformers and llama.cpp.

One run, one process, the same GGUF and the same prompts (as token ids) for every system,
--threads threads each:

  load             seconds from the GGUF path to a ready system, fresh each time (median of
                   --load-reps), and the resident memory each system added to the process
  prefill          a --prefill-tokens prompt, time to the first token (rounds, order rotated)
  batch-1 decode   one prompt, --decode-tokens greedy new tokens (EOS ignored); decode tok/s =
                   (new tokens - 1) / (last token time - first token time), so prefill is left
                   out. The systems take turns (--decode-reps rounds, the order rotated each
                   round) and the ratios to llama.cpp are taken within a round.
  64 requests      --requests prompts cut from Tiny Shakespeare with mixed prompt lengths
                   (uniform in --prompt-len) and mixed output lengths (uniform in --output-len,
                   greedy, EOS ignored so every system generates the same counts), first all
                   arriving together, then as a Poisson stream (same arrival times for every
                   system). Throughput = generated tokens / (last completion - first
                   submission); TTFT and end-to-end latency count from each request's
                   (scheduled) arrival, so they include queueing.
  perplexity       ours (native and fp32) and llama.cpp on the same held-out text (the last
                   10 % of Tiny Shakespeare, --ppl-tokens tokens in windows of --ppl-window)
  profile          where ours' batch-1 decode token goes (benchmarks/engine_profile.py):
                   per-phase time, achieved GB/s against the measured memory bandwidth

The systems (--systems):
  ours         mlsyskit.engine.LLM on the GGUF as stored (Q4_1/Q8_0 blocks memory-mapped,
               integer kernels, fused decode layers): paged KV cache, continuous batching
  ours_fp32    the same engine with dtype="float32" (the GGUF dequantized on load: the reference)
  ours_static  ours with batching="static" (a batch of up to max_num_seqs is admitted only when
               the previous one has completely finished)
  ours_naive   ours with kv_cache=False (recomputes the whole sequence every token): quadratic,
               so it runs a reduced workload (--naive-requests, --naive-max-tokens, arriving
               together; ours runs the same reduced workload next to it for the ratio) and a
               shorter batch-1 decode (--naive-decode-tokens, first round only)
  hf           transformers AutoModelForCausalLM on the same GGUF dequantized to fp32,
               generate() greedy, one request at a time in arrival order
  hf_batch     transformers generate() on left-padded batches of up to --hf-batch (64) waiting
               requests, each batch running to completion: all 64 at once when they arrive
               together
  llamacpp     llama.cpp through llama-cpp-python on the same Q4_1 GGUF (n_threads=--threads),
               one request at a time in arrival order (it serves one sequence at a time)

The Poisson rate (--rate, requests/s) defaults to --rate-factor x the request rate the fastest
one-by-one baseline (llama.cpp, else transformers) sustained in this run's all-together phase,
so the baselines are overloaded and ours is loaded. The engine-based systems serve the stream
live; the one-at-a-time systems are by default replayed (--replay-poisson): their measured
per-request service times from the all-together phase go through a FIFO queue with the same
arrival times, which is what a single-sequence server does. Every measurement of ours starts
from a fresh engine (same weights), so no phase profits from the prefix cache of an earlier one.
OMP_WAIT_POLICY=PASSIVE is set for all systems (--omp-wait-policy): on this shared machine
spinning OpenMP threads made llama.cpp's decode 3-4x and torch's prefill up to ~7x slower.
Greedy outputs are compared token by token: ours_fp32 vs transformers (same fp32 weights: they
should match), and native vs fp32 (int8 activations: a near tie can go either way).

Results: benchmarks/results/engine_throughput.json and a bar chart next to it (.png).
Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/engine_throughput.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the Hugging Face hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# The systems live in engine_peers; summaries, replay, greedy checks, goals, table and chart in
# engine_report. This file builds the workload and runs the phases.
import common  # noqa: E402
from engine_peers import Ours, Request, System, build_systems, load_times, tokenizer_agreement  # noqa: E402
from engine_profile import memory_bandwidth, profile_decode  # noqa: E402
from engine_report import (  # noqa: E402
    compute_goals,
    greedy_checks,
    plot,
    print_table,
    replay_fifo,
    summarize,
)

DEFAULT_OUT = common.RESULTS / "engine_throughput.json"

SYSTEMS = ("ours", "ours_fp32", "ours_static", "ours_naive", "hf", "hf_batch", "llamacpp")
DEFAULT_SYSTEMS = SYSTEMS
ONE_BY_ONE = ("hf", "llamacpp")
LABELS = {
    "ours": "mlsyskit engine, native Q4_1/Q8_0 (paged KV, continuous batching)",
    "ours_fp32": "mlsyskit engine, dtype='float32' (the GGUF dequantized on load)",
    "ours_static": "mlsyskit engine, native, batching='static'",
    "ours_naive": "mlsyskit engine, native, kv_cache=False (reduced workload)",
    "hf": "transformers generate (fp32), one request at a time",
    "hf_batch": "transformers generate (fp32), left-padded batches of all waiting requests",
    "llamacpp": "llama.cpp (llama-cpp-python, Q4_1), one request at a time",
}

# --quick: a smoke run (explicit flags still win)
QUICK = {
    "requests": 8, "prompt_len": [16, 128], "output_len": [8, 32], "decode_tokens": 32, "decode_reps": 1,
    "naive_requests": 2, "naive_max_tokens": 4, "naive_decode_tokens": 8, "prefill_reps": 1, "load_reps": 1,
    "ppl_tokens": 1024, "profile_tokens": 32,
}

FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
)


# --------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------


def load_text(data_dir: str | None) -> tuple[str, str]:
    path = common.find_file("shakespeare/input.txt", data_dir, "/work/shared/data", common.SHARED_DATA)
    if path is not None:
        return path.read_text(encoding="utf-8"), str(path)
    return FALLBACK_TEXT * 400, "built-in paragraph (Tiny Shakespeare not found)"


def held_out_ids(text: str, encode: Callable[[str], list[int]], n: int) -> list[int]:
    """The first ``n`` tokens of the text's last 10 % (the prompts come from the rest)."""
    return encode(text[int(0.9 * len(text)) :])[:n]


def cut_prompt(text: str, encode: Callable[[str], list[int]], rng: np.random.Generator, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids of the text from a random line start (re-tokenized after cutting,
    so the ids are exactly what a tokenizer gives for the prompt text)."""
    for _ in range(100):
        start = int(rng.integers(0, max(1, len(text) - 8 * n_tokens - 2)))
        nl = text.find("\n", start)
        start = nl + 1 if 0 <= nl < len(text) - 8 * n_tokens - 1 else start
        ids = encode(text[start : start + 8 * n_tokens + 64])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise RuntimeError(f"could not cut a {n_tokens}-token prompt from the text")


def make_workload(args: argparse.Namespace, encode: Callable[[str], list[int]], text: str) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    plo, phi = args.prompt_len
    olo, ohi = args.output_len
    text = text[: int(0.9 * len(text))]  # the last 10 % is the held-out perplexity text
    prompt_lens = rng.integers(plo, phi + 1, size=args.requests)
    out_lens = rng.integers(olo, ohi + 1, size=args.requests)
    requests = [Request(cut_prompt(text, encode, rng, int(p)), int(o)) for p, o in zip(prompt_lens, out_lens, strict=True)]
    decode_prompt = cut_prompt(text, encode, rng, args.decode_prompt_tokens)
    warm_prompt = cut_prompt(text, encode, rng, 96)
    prefill_prompt = cut_prompt(text, encode, rng, args.prefill_tokens)
    gaps = np.random.default_rng(args.seed + 1).exponential(1.0, size=args.requests)
    unit_arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])  # rate 1; scaled by 1/rate later
    return {
        "requests": requests,
        "decode_prompt": decode_prompt,
        "warm_prompt": warm_prompt,
        "prefill_prompt": prefill_prompt,
        "unit_arrivals": unit_arrivals,
    }


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


def prefill_round(systems: dict[str, System], wl: dict[str, Any], rnd: int) -> dict[str, dict[str, Any]]:
    """Time to the first token of the --prefill-tokens prompt (one new token)."""
    names = common.rotated([n for n in systems if n not in ("hf_batch", "ours_naive", "ours_static")], rnd)
    res = {}
    for name in names:
        systems[name].reset()
        la = common.loadavg()
        start, first, _, _ = systems[name].generate1(wl["prefill_prompt"], 1)
        n = len(wl["prefill_prompt"])
        res[name] = {"round": rnd, "prompt_tokens": n, "prefill_s": round(first - start, 4),
                     "prefill_tok_s": round(n / (first - start), 1), "loadavg_1m": la}
        print(f"  round {rnd} {name:12s} {res[name]['prefill_tok_s']} tok/s prefill (load {la})", flush=True)
    return res


def decode_round(systems: dict[str, System], wl: dict[str, Any], args: argparse.Namespace, rnd: int) -> dict[str, dict[str, Any]]:
    # hf_batch's batch-1 generate() is hf's; kv_cache=False (slow) runs in the first round only
    names = [n for n in systems if n != "hf_batch" and (n != "ours_naive" or rnd == 0)]
    names = common.rotated(names, rnd)
    res = {}
    for name in names:
        n = args.naive_decode_tokens if name == "ours_naive" else args.decode_tokens
        systems[name].reset()
        la = common.loadavg()
        start, first, last, toks = systems[name].generate1(wl["decode_prompt"], n)
        res[name] = {
            "round": rnd, "new_tokens": len(toks), "prefill_s": round(first - start, 4),
            "decode_s": round(last - first, 4),
            "decode_tok_s": common.decode_tok_s(len(toks), first, last),
            "loadavg_1m": la, "tokens": toks,
        }
        print(f"  round {rnd} {name:12s} {res[name]['decode_tok_s']} tok/s decode "
              f"(prefill {res[name]['prefill_s']:.3f} s, load {la})", flush=True)
    return res


def run_serve(system: System, reqs: list[Request], arrivals: np.ndarray, tag: str) -> dict[str, Any]:
    system.reset()
    la0 = common.loadavg()
    records, wall, extra = system.serve(reqs, arrivals)
    res = summarize(records, wall)
    res.update(extra)
    res["loadavg_1m_before"], res["loadavg_1m_after"] = la0, common.loadavg()
    res["tokens"] = [r["tokens"] for r in records]
    print(f"  {tag:8s} {system.name:12s} {res['throughput_tok_s']:8.1f} tok/s  wall {res['wall_s']:7.1f} s  "
          f"TTFT p50 {res['ttft_p50_s']:.3f} p99 {res['ttft_p99_s']:.3f} s  (load {la0}->{res['loadavg_1m_after']})",
          flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    args = common.parse_with_quick(build_parser(), argv, QUICK)
    if args.omp_wait_policy:  # before torch (and llama.cpp) start their OpenMP runtimes
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    args.prompt_len = [int(x) for x in args.prompt_len]
    args.output_len = [int(x) for x in args.output_len]
    names = common.split_names(args.systems)
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        print(f"unknown systems {bad}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    load_start = common.loadavgs()

    import torch

    torch.set_num_threads(args.threads)
    from mlsyskit.engine import default_model_path, load_checkpoint
    from mlsyskit.quant import kernels

    kernel_info = {"variant": kernels.variant() or f"none ({kernels.status()})", "features": sorted(kernels.cpu_features())}
    gguf = Path(args.model) if args.model else default_model_path()
    print(f"[engine_throughput] model {gguf}; threads {args.threads}; load average {load_start[0]:.2f}", flush=True)
    ckpt = load_checkpoint(gguf)  # fp32: the reference
    native = load_checkpoint(gguf, native=True)
    tok = ckpt.tokenizer
    text, text_source = load_text(args.data_dir)
    wl = make_workload(args, tok.encode, text)
    reqs: list[Request] = wl["requests"]

    # ---- phase 0: load time, fresh from the GGUF path ---------------------------------------
    print(f"[engine_throughput] load times ({args.load_reps} fresh loads each)", flush=True)
    loads = {} if args.together_only else load_times(gguf, names, args.load_reps, args.threads)
    for n, v in loads.items():
        print(f"  {n:12s} {v['load_s_median']} s", flush=True)

    print("[engine_throughput] loading systems", flush=True)
    systems, sys_info = build_systems(names, args, {"native": native, "fp32": ckpt}, gguf)

    # Every system gets token ids, but the prompts came from our tokenizer: do the others agree?
    tok_check = tokenizer_agreement(systems, tok, reqs)

    print("[engine_throughput] warm-up", flush=True)
    for n, s in systems.items():
        if isinstance(s, Ours):
            s.warm_prompt = wl["warm_prompt"]
        if n != "hf_batch":
            s.generate1(wl["warm_prompt"], 8)

    if args.together_only:
        return rerun_together(args, systems, reqs, load_start, t_start)

    # ---- phase 1a: prefill, systems taking turns --------------------------------------------
    print(f"[engine_throughput] prefill: a {args.prefill_tokens}-token prompt, {args.prefill_reps} rounds", flush=True)
    prefill_rounds = [prefill_round(systems, wl, r) for r in range(args.prefill_reps)]

    # ---- phase 1: batch-1 decode, systems taking turns --------------------------------------
    print(f"[engine_throughput] batch-1 decode: {args.decode_prompt_tokens}-token prompt, "
          f"{args.decode_tokens} new tokens, {args.decode_reps} rounds", flush=True)
    rounds = [decode_round(systems, wl, args, r) for r in range(args.decode_reps)]
    results: dict[str, dict[str, Any]] = {n: dict(sys_info[n], label=LABELS[n]) for n in names}
    for n, v in loads.items():
        results.setdefault(n, {})["load"] = v
    for n in systems:
        vals = [r[n]["prefill_tok_s"] for r in prefill_rounds if n in r]
        if vals:
            results[n]["prefill"] = {"prompt_tokens": args.prefill_tokens, "prefill_tok_s_median": round(float(np.median(vals)), 1),
                                     "rounds": [r[n] for r in prefill_rounds if n in r]}
        if n == "hf_batch":
            results[n]["decode_tok_s_batch1"] = None  # batch 1 is plain hf
            continue
        vals = [r[n]["decode_tok_s"] for r in rounds if n in r and r[n]["decode_tok_s"]]
        results[n]["batch1"] = {
            "prompt_tokens": args.decode_prompt_tokens,
            "new_tokens": rounds[0][n]["new_tokens"],
            "decode_tok_s_median": round(float(np.median(vals)), 2) if vals else None,
            "rounds": [{k: v for k, v in r[n].items() if k != "tokens"} for r in rounds if n in r],
        }
        results[n]["decode_tok_s_batch1"] = results[n]["batch1"]["decode_tok_s_median"]

    # ---- phase 2: all requests arriving together ------------------------------------------
    print(f"[engine_throughput] {len(reqs)} requests arriving together", flush=True)
    zero = np.zeros(len(reqs))
    together_order = [n for n in ("ours", "ours_static", "ours_fp32", "llamacpp", "hf", "hf_batch") if n in systems]
    for n in together_order:
        results[n]["together"] = run_serve(systems[n], reqs, zero, "together")
        time.sleep(args.settle)

    # ---- phase 3: kv_cache=False on a reduced workload, next to ours on the same ----------
    naive_reqs = [Request(r.prompt_ids, min(r.max_tokens, args.naive_max_tokens)) for r in reqs[: args.naive_requests]]
    if "ours_naive" in systems:
        print(f"[engine_throughput] kv_cache=False: {len(naive_reqs)} requests, <= {args.naive_max_tokens} new tokens each", flush=True)
        nz = np.zeros(len(naive_reqs))
        results["ours_naive"]["reduced"] = run_serve(systems["ours_naive"], naive_reqs, nz, "reduced")
        if "ours" in systems:
            results["ours"]["reduced"] = run_serve(systems["ours"], naive_reqs, nz, "reduced")

    # ---- phase 4: Poisson stream ----------------------------------------------------------
    rate, basis = args.rate, "--rate"
    if rate is None:
        base = next((n for n in ("llamacpp", "hf") if "together" in results.get(n, {})), None)
        if base:
            rate = args.rate_factor * len(reqs) / results[base]["together"]["wall_s"]
            basis = f"{args.rate_factor} x the request rate {base} sustained serving the requests one by one (together phase)"
        elif "ours" in results and "together" in results["ours"]:
            rate = 0.75 * len(reqs) / results["ours"]["together"]["wall_s"]
            basis = "0.75 x the request rate ours sustained in the together phase (no one-by-one baseline ran)"
        else:
            rate, basis = 1.0, "default 1 request/s"
    arrivals = wl["unit_arrivals"] / rate
    replay = set(common.split_names(args.replay_poisson))
    print(f"[engine_throughput] Poisson stream: {rate:.3f} requests/s ({basis}); last arrival at {arrivals[-1]:.1f} s", flush=True)
    for n in together_order:
        if n in ONE_BY_ONE and n in replay:
            results[n]["poisson"] = replay_fifo(results[n]["together"], arrivals)
            p = results[n]["poisson"]
            print(f"  poisson  {n:12s} replayed: TTFT p50 {p['ttft_p50_s']:.3f} p99 {p['ttft_p99_s']:.3f} s", flush=True)
        else:
            results[n]["poisson"] = run_serve(systems[n], reqs, arrivals, "poisson")
        time.sleep(args.settle)

    # ---- phase 5: perplexity on held-out text ---------------------------------------------
    ppl_ids = held_out_ids(text, tok.encode, args.ppl_tokens)
    print(f"[engine_throughput] perplexity: {len(ppl_ids)} held-out tokens in windows of {args.ppl_window}", flush=True)
    perplexity: dict[str, Any] = {"tokens": len(ppl_ids), "window": args.ppl_window,
                                  "text": "the first tokens of the last 10 % of the text (prompts come from the rest)"}
    for n in ("ours", "ours_fp32", "llamacpp"):
        if n in systems:
            (nll, count), secs = common.timed(systems[n].nll, ppl_ids, args.ppl_window)  # type: ignore[attr-defined]
            perplexity[n] = {"perplexity": round(float(np.exp(nll / count)), 4), "scored_tokens": count, "s": round(secs, 1)}
            print(f"  {n:12s} perplexity {perplexity[n]['perplexity']}", flush=True)

    # ---- phase 6: where ours' batch-1 decode time goes ----------------------------------------
    profile: dict[str, Any] = {}
    if "ours" in systems:
        print("[engine_throughput] profile of ours' batch-1 decode", flush=True)
        systems["ours"].reset()
        profile = {"memory_bandwidth": memory_bandwidth(args.threads),
                   "decode": profile_decode(systems["ours"].llm, wl["decode_prompt"], args.profile_tokens, args.threads)}  # type: ignore[attr-defined]
        torch.set_num_threads(args.threads)

    # ---- correctness ----------------------------------------------------------------------
    correctness = {"tokenizers": tok_check, **greedy_checks(results, rounds, systems, tok.decode)}
    for n in results:
        for phase in ("together", "poisson", "reduced"):
            results[n].get(phase, {}).pop("tokens", None)

    # ---- goals ----------------------------------------------------------------------------
    goals = compute_goals(results, rounds, prefill_rounds, perplexity)
    load_end = common.loadavgs()
    report: dict[str, Any] = {
        "benchmark": "engine_throughput",
        **common.run_stamp(),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "host": {
            **common.platform_info(),
            "cpus": common.usable_cpus(),
            "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch_threads": torch.get_num_threads(),
            "versions": common.package_versions(
                ("torch", "transformers", "tokenizers", "gguf", "llama_cpp_python", "numpy")
            ),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "note": "shared, noisy 2-core machine: compare ratios measured in this run and the "
            "loadavg_1m recorded next to every measurement",
        },
        "model": {"path": str(gguf), "file_type": ckpt.file_type, "arch": ckpt.config.arch,
                  "n_layers": ckpt.config.n_layers, "dim": ckpt.config.dim, "vocab_size": ckpt.config.vocab_size,
                  "precision": "ours (native) and llama.cpp: the Q4_1/Q8_0 blocks as stored, activations rounded "
                  "to int8 per block of 32 for the products (ours: bf16 dense GEMMs from 16 rows on where the CPU "
                  "has AMX / AVX-512 BF16); ours_fp32 and transformers: the GGUF dequantized to fp32"},
        "kernels": {"variant": kernel_info["variant"], "cpu_features": kernel_info["features"]},
        "settings": {k: v for k, v in vars(args).items()},
        "workload": {
            "text_source": text_source,
            "requests": len(reqs),
            "prompt_len_range": args.prompt_len,
            "output_len_range": args.output_len,
            "prompt_lens": [len(r.prompt_ids) for r in reqs],
            "output_lens": [r.max_tokens for r in reqs],
            "total_prompt_tokens": sum(len(r.prompt_ids) for r in reqs),
            "total_output_tokens": sum(r.max_tokens for r in reqs),
            "sampling": "greedy (temperature 0), EOS ignored: every system generates exactly the requested counts",
            "prompts_as": "token ids from the GGUF's tokenizer, identical for every system",
            "poisson": {"rate_req_s": round(rate, 4), "rate_basis": basis, "seed": args.seed + 1,
                        "arrivals_s": [round(float(a), 4) for a in arrivals],
                        "replayed": sorted(replay & set(ONE_BY_ONE) & set(systems)),
                        "replay_note": "replayed systems' Poisson numbers come from their together-run "
                        "per-request service times put through a FIFO queue (see replay_fifo)"},
            "naive_reduced": {"requests": len(naive_reqs), "output_lens": [r.max_tokens for r in naive_reqs],
                              "prompt_lens": [len(r.prompt_ids) for r in naive_reqs],
                              "note": "kv_cache=False recomputes every sequence each token, so it runs "
                              "the first --naive-requests requests with outputs capped at "
                              "--naive-max-tokens, all arriving together; ours runs the same"},
            "batch1_decode": {"prompt_tokens": args.decode_prompt_tokens, "new_tokens": args.decode_tokens,
                              "naive_new_tokens": args.naive_decode_tokens, "naive_rounds": 1, "rounds": args.decode_reps,
                              "measure": "(new tokens - 1) / (time of last token - time of first token)"},
        },
        "systems": results,
        "perplexity": perplexity,
        "profile": profile,
        "correctness": correctness,
        "goals": goals,
    }
    out = common.write_json(args.out, report, default=str)
    png = out.with_suffix(".png")
    try:
        plot(results, goals, png)
    except Exception as e:  # the chart is a convenience
        print(f"could not draw the chart: {e}")
    print_table(report)
    print(f"\nwrote {out}" + (f" and {png}" if png.exists() else "") + f" in {report['total_wall_s']:.0f} s")
    return 0


def rerun_together(args: argparse.Namespace, systems: dict[str, System], reqs: list[Request],
                   load_start: list[float], t_start: float) -> int:
    """--together-only: re-measure the all-together phase of the given systems and replace
    their rows (and the throughput goals) in the existing report; the rest of it is kept."""
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "engine_throughput", "systems": {}, "goals": {}}
    zero = np.zeros(len(reqs))
    rerun: dict[str, Any] = {**common.run_stamp(), "systems": list(systems), "loadavg_start": load_start}
    for n in [n for n in ("ours", "ours_static", "ours_fp32", "llamacpp", "hf", "hf_batch") if n in systems]:
        res = run_serve(systems[n], reqs, zero, "together")
        res.pop("tokens", None)
        report["systems"].setdefault(n, {"label": LABELS[n]})["together"] = {**res, "rerun": rerun["created"]}
        time.sleep(args.settle)
    rerun["loadavg_end"] = common.loadavgs()
    rerun["wall_s"] = round(time.perf_counter() - t_start, 1)
    goals = compute_goals(report["systems"], [], [], {})
    for key in [k for k in goals if k.startswith(("throughput_", "info_throughput_"))]:
        report["goals"][key] = {**goals[key], "rerun": rerun["created"]} if isinstance(goals[key], dict) else goals[key]
    report.setdefault("together_reruns", []).append(rerun)
    common.write_json(out, report, default=str)
    print_table(report)
    print(f"\nupdated {out} (together phase of {', '.join(systems)}) in {rerun['wall_s']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about 2 min on an idle machine): 8 requests, prompts 16-128, outputs "
                   "8-32, 32-token batch-1 decode, 1 round, tiny kv_cache=False workload")
    p.add_argument("--together-only", action="store_true",
                   help="re-measure only the all-together phase of --systems (no load, prefill, decode, Poisson, "
                   "perplexity or profile) and replace their rows and the throughput goals in the existing --out "
                   "report (default: off, the full run)")
    p.add_argument("--requests", type=int, default=64, help="requests in the serving workload (default: 64)")
    p.add_argument("--prompt-len", nargs=2, type=int, default=[16, 256], metavar=("MIN", "MAX"),
                   help="prompt lengths in tokens, uniform (default: 16 256; 16 512 doubles the run time)")
    p.add_argument("--output-len", nargs=2, type=int, default=[16, 96], metavar=("MIN", "MAX"),
                   help="new tokens per request, uniform (default: 16 96; 16 256 more than doubles the run time)")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens of the batch-1 decode run (default: 64)")
    p.add_argument("--decode-prompt-tokens", type=int, default=64, help="prompt tokens of the batch-1 decode run (default: 64)")
    p.add_argument("--decode-reps", type=int, default=3, help="rounds of the batch-1 decode run, systems taking turns (default: 3)")
    p.add_argument("--naive-requests", type=int, default=4, help="requests of the kv_cache=False reduced workload (default: 4)")
    p.add_argument("--naive-max-tokens", type=int, default=16, help="new tokens cap of the kv_cache=False reduced workload (default: 16)")
    p.add_argument("--naive-decode-tokens", type=int, default=32,
                   help="new tokens of kv_cache=False's batch-1 decode run, first round only (default: 32)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens of the prefill measurement (default: 512)")
    p.add_argument("--prefill-reps", type=int, default=3, help="rounds of the prefill measurement (default: 3)")
    p.add_argument("--load-reps", type=int, default=3, help="fresh loads per system for the load time (default: 3)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored for perplexity (default: 4096)")
    p.add_argument("--ppl-window", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--profile-tokens", type=int, default=128, help="decode tokens of ours' profile (default: 128)")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrival rate in requests/s (default: --rate-factor x what the fastest one-by-one baseline sustained)")
    p.add_argument("--rate-factor", type=float, default=1.5,
                   help="default rate = this x the request rate of the one-by-one baseline (default: 1.5)")
    p.add_argument("--replay-poisson", default="hf,llamacpp",
                   help="comma-separated one-request-at-a-time systems (hf, llamacpp) whose Poisson run is not "
                   "served live but replayed: their per-request service times from the all-together run are "
                   "put through a FIFO queue with the Poisson arrival times (what a single-sequence server "
                   "does, without re-measuring the same service times under different machine load; saves "
                   "~5 min for hf and ~3 min for llamacpp). '' = serve every system live (default: hf,llamacpp)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (ours, transformers) and llama.cpp n_threads (default: 2)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for every system's OpenMP runtime, unless already set in the "
                   "environment. PASSIVE (default): idle threads sleep instead of spinning; on a shared, "
                   "oversubscribed machine spinning made 2-thread prefill up to ~7x slower than 1 thread. "
                   "'' = the runtimes' defaults")
    p.add_argument("--block-size", type=int, default=16, help="ours: KV block size (default: 16)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="ours: KV pool blocks (default: the engine's, about 1 GiB)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="ours: token budget per step (default: 512)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="ours: max running sequences (default: 64)")
    p.add_argument("--static-max-seqs", type=int, default=64,
                   help="ours_static: batch size of static batching (default: 64, the same as ours)")
    p.add_argument("--hf-batch", type=int, default=64, help="hf_batch: max requests per left-padded generate() batch (default: 64)")
    p.add_argument("--llama-n-ctx", type=int, default=2048, help="llama.cpp context size (default: 2048)")
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--data-dir", default=common.env_data_dir(),
                   help="data dir holding shakespeare/input.txt (default: $MLSYSKIT_DATA_DIR, then /work/shared/data)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (prompts, lengths; arrivals use seed+1) (default: 0)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to pause between systems (default: 2)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report (the PNG goes next to it) (default: benchmarks/results/engine_throughput.json)")
    return p


if __name__ == "__main__":
    sys.exit(main())
