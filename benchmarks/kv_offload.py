"""KV tiers on a multi-turn chat workload: recompute vs swap vs tier reuse (host memory, disk,
disk after a restart), SmolLM2-135M native (Q4_1/Q8_0 blocks, float16 KV), and llama.cpp's
prompt-state cache as the peer.

The workload: --conversations chats of --turns turns each. A turn's prompt is the whole
conversation so far (a shared system prompt, the earlier user messages and replies, the new
message: 40-70 tokens of Tiny Shakespeare) in SmolLM2's chat template; a reply is
--reply-tokens greedy tokens (EOS ignored). Conversations start --stagger seconds apart and a
user answers --think seconds after a reply is complete, so many conversations are open at
once. The KV pool holds a quarter of the conversations at their longest (--pool-fraction):
between two turns of a conversation its blocks are mostly evicted by the others.

Modes (each a fresh engine on the same weights, the same arrivals):
  recompute   no tier: what the pool's prefix cache still holds is reused, the rest of the
              history is prefilled again; a preempted request is recomputed
  swap        a host tier that only takes preempted requests' blocks (swap instead of recompute)
  tier        kv_offload="cpu": evicted prefix blocks go to host memory and come back for the
              next turn; preempted requests are swapped (preemption="auto": the cost model)
  disk        kv_offload="disk" with a host tier of an eighth of the workload: most reused blocks
              come from memory-mapped files
  disk-restart  a new engine on the disk mode's directory replays the workload: its prefixes
              (every turn's history) are found on disk from the start

Per turn: TTFT p50/p99 (from the request's arrival, so queueing counts), and per mode the decode
tokens/s of each request ((tokens - 1) / (last - first token)), generated tokens per second of
engine time, prefilled tokens, bytes moved each way and the time spent copying. Greedy replies
are compared with the recompute mode's.

The peer: llama.cpp (llama-cpp-python) serves one sequence at a time; with its RAM prompt
cache (LlamaRAMCache) a prompt whose prefix was seen resumes from the saved state. It replays
the same turns in the same order, one by one (no think time, no queue): TTFT p50 per turn with
and without the cache (--peer-conversations of the conversations, it is serial).

Results: benchmarks/results/kv_offload.json and .png.
Run:  flock -x /tmp/quiet.lock .venv/bin/python benchmarks/kv_offload.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SYSTEM = "You are a well-read assistant. Answer questions about the quoted lines in one or two sentences."
MODES = ("recompute", "swap", "tier", "disk", "disk-restart")


def messages(n: int, seed: int) -> list[str]:
    """``n`` user messages of a few lines of Tiny Shakespeare each (a fixed fallback text
    when the data set is not there)."""
    import numpy as np

    path = common.find_file("shakespeare/input.txt", common.default_data_dir(existing_only=True))
    text = path.read_text() if path else ("To be, or not to be, that is the question.\n" * 400)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i = int(rng.integers(0, len(lines) - 4))
        k = int(rng.integers(2, 4))
        out.append("What do these lines mean? " + " ".join(lines[i : i + k]))
    return out


def run_mode(mode: str, args: argparse.Namespace, ckpt: Any, msgs: list[list[str]], disk_dir: Path,
             num_blocks: int, host_gib: float) -> dict[str, Any]:
    """Drive one engine through the conversations; per-request records and the tier counters."""
    from mlsyskit.engine import LLM, SamplingParams

    kw: dict[str, Any] = {"num_kv_blocks": num_blocks, "max_num_seqs": args.max_num_seqs}
    if mode == "recompute":
        kw.update(preemption="recompute")
    elif mode == "swap":
        kw.update(kv_offload="cpu", kv_offload_gib=host_gib, preemption="swap", kv_tier_prefix=False)
    elif mode == "tier":
        kw.update(kv_offload="cpu", kv_offload_gib=host_gib)
    else:
        kw.update(kv_offload="disk", kv_offload_gib=host_gib / 8, kv_offload_dir=disk_dir)
    llm = LLM(ckpt, **kw)
    eng = llm.engine
    params = SamplingParams(max_tokens=args.reply_tokens, temperature=0, ignore_eos=True)
    n_conv, n_turns = len(msgs), len(msgs[0])
    history: list[list[dict[str, str]]] = [[{"role": "system", "content": SYSTEM}] for _ in range(n_conv)]
    turn = [0] * n_conv
    t0 = time.perf_counter()
    arrival = [t0 + c * args.stagger for c in range(n_conv)]  # next turn's arrival (None: in flight/done)
    inflight: dict[str, tuple[int, int, float, int]] = {}
    records: list[dict[str, Any]] = []
    busy = 0.0
    while len(records) < n_conv * n_turns:
        now = time.perf_counter()
        for c in range(n_conv):
            if arrival[c] is not None and arrival[c] <= now:
                history[c].append({"role": "user", "content": msgs[c][turn[c]]})
                ids = llm.chat_prompt(history[c])
                rid = eng.add_request(ids, params, request_id=f"{c}-{turn[c]}")
                inflight[rid] = (c, turn[c], arrival[c], len(ids))
                arrival[c] = None
        if not eng.has_unfinished():
            nxt = min(a for a in arrival if a is not None)
            time.sleep(max(0.0, nxt - time.perf_counter()))
            continue
        s0 = time.perf_counter()
        outs = eng.step()
        busy += time.perf_counter() - s0
        for o in outs:
            if not o.finished:
                continue
            c, k, arr, plen = inflight.pop(o.request_id)
            reply = llm.tokenizer.decode(o.token_ids)
            history[c].append({"role": "assistant", "content": reply})
            n = len(o.token_ids)
            records.append({
                "conv": c, "turn": k, "prompt_tokens": plen, "cached_tokens": o.num_prefix_cached_tokens,
                "ttft_s": o.first_token_time - arr, "preemptions": o.num_preemptions,
                "decode_tok_s": (n - 1) / (o.finish_time - o.first_token_time) if n > 1 and o.finish_time > o.first_token_time else None,
                "token_ids": o.token_ids,
            })
            turn[c] += 1
            if turn[c] < n_turns:
                arrival[c] = time.perf_counter() + args.think
    wall = time.perf_counter() - t0
    usage = eng.kv_usage()
    llm.close()
    gen = sum(len(r["token_ids"]) for r in records)
    return {"records": records, "wall_s": wall, "engine_busy_s": busy, "generated_tokens": gen,
            "tokens_computed": eng.tokens_computed, "kv_usage": usage, "engine_kwargs": {k: str(v) for k, v in kw.items()}}


def summarize(name: str, run: dict[str, Any], n_turns: int, ref: dict[tuple[int, int], list[int]] | None) -> dict[str, Any]:
    recs = run["records"]
    per_turn = []
    for k in range(n_turns):
        rs = [r for r in recs if r["turn"] == k]
        t = [r["ttft_s"] for r in rs]
        per_turn.append({
            "turn": k + 1, "requests": len(rs), "ttft_p50_s": common.percentile(t, 50), "ttft_p99_s": common.percentile(t, 99),
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in rs) / len(rs), 1),
            "cached_tokens_mean": round(sum(r["cached_tokens"] for r in rs) / len(rs), 1),
        })
    dec = [r["decode_tok_s"] for r in recs if r["decode_tok_s"]]
    u = run["kv_usage"]
    moved = {k.removeprefix("tier_"): u[k] for k in u if k.startswith("tier_bytes")}
    later = [r["ttft_s"] for r in recs if r["turn"] > 0]
    out = {
        "mode": name, "per_turn": per_turn,
        "ttft_p50_turns_2plus_s": common.percentile(later, 50), "ttft_p99_turns_2plus_s": common.percentile(later, 99),
        "decode_tok_s_p50": common.percentile(dec, 50),
        "throughput_tok_per_engine_s": round(run["generated_tokens"] / run["engine_busy_s"], 2),
        "wall_s": round(run["wall_s"], 2), "engine_busy_s": round(run["engine_busy_s"], 2),
        "tokens_computed": run["tokens_computed"], "generated_tokens": run["generated_tokens"],
        "bytes_moved": moved, "copy_wait_s": round(u.get("tier_copy_wait_s", 0.0), 4),
        "preemptions": u.get("preemptions"), "preemptions_swapped": u.get("preemptions_swapped"),
        "hit_rate_cpu": u.get("tier_cpu_hit_rate"), "hit_rate_disk": u.get("tier_disk_hit_rate"),
        "tier_hit_tokens": u.get("tier_hit_tokens"), "prefix_hit_rate": round(u["prefix_hit_rate"], 4),
        "engine_kwargs": run["engine_kwargs"],
    }
    if ref is not None:
        same = sum(ref[(r["conv"], r["turn"])] == r["token_ids"] for r in recs)
        out["replies_equal_to_recompute"] = f"{same}/{len(recs)}"
    return out


def run_peer(args: argparse.Namespace, gguf: Path, ckpt: Any, prompts: list[list[list[int]]]) -> dict[str, Any]:
    """llama.cpp, one request at a time in the engine's turn order, with and without its RAM
    prompt cache. The prompts are the engine's (token ids), so both see the same contexts."""
    from llama_cpp import Llama, LlamaRAMCache

    out: dict[str, Any] = {}
    n_turns = len(prompts[0])
    for cached in (False, True):
        llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                    n_batch=512, verbose=False)
        if cached:
            llm.set_cache(LlamaRAMCache(capacity_bytes=2 << 30))
        ttft: dict[int, list[float]] = {k: [] for k in range(n_turns)}
        for k in range(n_turns):
            for conv in prompts:
                ids = conv[k]
                t0 = time.perf_counter()
                n = 0
                reset = True
                if cached:  # what create_completion does (generate() alone never consults the cache)
                    try:
                        llm.load_state(llm.cache[ids])  # the longest cached prefix's state
                        reset = False  # generate() then evaluates only the tokens after it
                    except KeyError:
                        pass
                for _tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=reset):
                    if n == 0:
                        ttft[k].append(time.perf_counter() - t0)
                    n += 1
                    if n >= args.reply_tokens:
                        break
                if cached:  # what create_completion does after a reply: keep the state
                    llm.cache[llm._input_ids.tolist()] = llm.save_state()
        out["llamacpp_ramcache" if cached else "llamacpp"] = {
            "per_turn_ttft_p50_s": [common.percentile(ttft[k], 50) for k in range(n_turns)],
            "ttft_p50_turns_2plus_s": common.percentile([t for k in range(1, n_turns) for t in ttft[k]], 50),
        }
        del llm
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in result["modes"]:
        turns = [p["turn"] for p in m["per_turn"]]
        axes[0].plot(turns, [p["ttft_p50_s"] * 1000 for p in m["per_turn"]], marker="o", label=m["mode"])
    for name, p in result.get("peer", {}).items():
        if isinstance(p, dict) and "per_turn_ttft_p50_s" in p:
            axes[0].plot(range(1, len(p["per_turn_ttft_p50_s"]) + 1), [t * 1000 for t in p["per_turn_ttft_p50_s"]],
                         linestyle="--", marker="x", label=f"{name} (serial)")
    axes[0].set_xlabel("turn")
    axes[0].set_ylabel("TTFT p50 (ms)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title("time to first token per turn")
    names = [m["mode"] for m in result["modes"]]
    axes[1].bar(names, [m["decode_tok_s_p50"] for m in result["modes"]])
    axes[1].set_ylabel("decode tok/s per request (p50)")
    axes[1].set_title("decode speed")
    fig.suptitle(result["title"], fontsize=9)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--think", type=float, default=1.0, help="seconds between a reply and the next message")
    ap.add_argument("--stagger", type=float, default=0.25, help="seconds between conversation starts")
    ap.add_argument("--pool-fraction", type=float, default=0.25, help="the pool holds this share of the conversations at their longest")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--peer-conversations", type=int, default=8, help="0: no llama.cpp peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(common.RESULTS / "kv_offload.json"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 conversations x 3 turns")
    args = common.parse_with_quick(ap, argv, {"conversations": 8, "turns": 3, "peer_conversations": 2, "think": 0.3})
    import torch

    from mlsyskit.engine import load_checkpoint
    from mlsyskit.engine.kv_cost import kv_bytes_per_token
    from mlsyskit.models.checkpoint import default_model_path

    torch.set_num_threads(args.threads)
    modes = common.split_names(args.modes)
    gguf = Path(default_model_path())
    ckpt = load_checkpoint(gguf)
    cfg = ckpt.config
    all_msgs = messages(args.conversations * args.turns, args.seed)
    msgs = [all_msgs[c * args.turns : (c + 1) * args.turns] for c in range(args.conversations)]
    # the longest conversation's context: system + every message + every reply (an upper bound)
    tok = ckpt.tokenizer
    longest = max(len(tok.encode(SYSTEM)) + sum(len(tok.encode(m)) + 12 for m in conv) + args.turns * (args.reply_tokens + 6)
                  for conv in msgs)
    block = 16
    num_blocks = max(-(-longest // block) + 1, int(args.conversations * args.pool_fraction * -(-longest // block)))
    kvb = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 2)
    host_gib = max(0.05, 1.5 * args.conversations * longest * kvb / 2**30)  # the whole workload fits
    common.log(f"{args.conversations} conversations x {args.turns} turns, longest context ~{longest} tokens, "
               f"pool {num_blocks} blocks of {block} ({num_blocks * block * kvb / 2**20:.1f} MiB), host tier {host_gib * 1024:.0f} MiB")
    disk_dir = Path(tempfile.mkdtemp(prefix="kv_offload_bench_"))
    load0 = common.loadavgs()
    runs: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            common.log(f"mode {mode} ...")
            runs[mode] = run_mode(mode, args, ckpt, msgs, disk_dir, num_blocks, host_gib)
            common.log(f"  {mode}: {runs[mode]['wall_s']:.1f} s wall, {runs[mode]['engine_busy_s']:.1f} s engine, "
                       f"{runs[mode]['tokens_computed']} tokens computed")
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    ref = None
    if "recompute" in runs:
        ref = {(r["conv"], r["turn"]): r["token_ids"] for r in runs["recompute"]["records"]}
    summaries = [summarize(m, runs[m], args.turns, ref if m != "recompute" else None) for m in modes]
    base = next((s for s in summaries if s["mode"] == "recompute"), None)
    if base is not None:
        for s in summaries:
            s["speedup_ttft_p50_turns_2plus"] = round(base["ttft_p50_turns_2plus_s"] / s["ttft_p50_turns_2plus_s"], 2)
            s["speedup_ttft_p50_per_turn"] = [round(b["ttft_p50_s"] / p["ttft_p50_s"], 2)
                                              for b, p in zip(base["per_turn"], s["per_turn"], strict=True)]
            s["decode_tok_s_ratio"] = round(s["decode_tok_s_p50"] / base["decode_tok_s_p50"], 3)
            s["throughput_ratio"] = round(s["throughput_tok_per_engine_s"] / base["throughput_tok_per_engine_s"], 3)
    peer: dict[str, Any] = {}
    if args.peer_conversations > 0:
        common.log("peer: llama.cpp with and without its RAM prompt cache ...")
        try:
            prompts = []
            by = {(r["conv"], r["turn"]): r for r in runs[modes[0]]["records"]}
            for c in range(min(args.peer_conversations, args.conversations)):
                hist = [{"role": "system", "content": SYSTEM}]
                conv = []
                for k in range(args.turns):
                    hist.append({"role": "user", "content": msgs[c][k]})
                    conv.append(tok.encode(tok.apply_chat_template(hist, add_generation_prompt=True), add_bos=False))
                    hist.append({"role": "assistant", "content": tok.decode(by[(c, k)]["token_ids"])})
                prompts.append(conv)
            peer = run_peer(args, gguf, ckpt, prompts)
        except ImportError as e:
            peer = {"skipped": f"llama-cpp-python is not installed ({e})"}
    result = {
        "title": f"KV tiers, SmolLM2-135M native: {args.conversations} conversations x {args.turns} turns, pool for "
                 f"{args.pool_fraction:.0%} of them, {args.threads} threads",
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "num_kv_blocks": num_blocks, "block_size": block,
                   "longest_context_tokens": longest, "host_tier_gib": round(host_gib, 3),
                   "kv_bytes_per_token": kvb, "model": str(gguf)},
        "modes": summaries, "peer": peer,
        "machine": {**common.platform_info(), "cpus": common.usable_cpus(), "loadavg_before": load0,
                    "loadavg_after": common.loadavgs()},
        "stamp": common.run_stamp(),
    }
    out = common.write_json(args.out, result)
    plot(result, out.with_suffix(".png"))
    for s in summaries:
        common.log(f"{s['mode']:>13}: TTFT p50 turns 2+ {s['ttft_p50_turns_2plus_s'] * 1000:.0f} ms "
                   f"(x{s.get('speedup_ttft_p50_turns_2plus', 1)}), decode {s['decode_tok_s_p50']} tok/s, "
                   f"{s['throughput_tok_per_engine_s']} tok/engine-s, computed {s['tokens_computed']}, "
                   f"equal {s.get('replies_equal_to_recompute', '-')}")
    common.log(f"peer: {peer}")
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
