"""KV tiers on a multi-turn chat workload: recompute vs swap vs tier reuse (host memory, disk,
disk after a restart), SmolLM2-135M native (Q4_1/Q8_0 blocks, float16 KV), and llama.cpp's
prompt-state caches (RAM and disk) as the peer.

The workload: --conversations chats of --turns turns each. Each conversation is about its own
document (--doc-tokens tokens of Tiny Shakespeare in the system message, as a RAG or
"chat with this file" app sends it); a user message is a short question quoting a line of it;
a reply is --reply-tokens greedy tokens (EOS ignored). A turn's prompt is the whole
conversation so far in SmolLM2's chat template, so turn k's context is the document plus
k - 1 earlier exchanges. The KV pool holds --pool-fraction of the conversations at their
longest: between two turns of a conversation its blocks are mostly evicted by the others.

Two scenarios (--scenario), the same conversations:
  closed-loop  users take turns: conversation c starts at a random time in the first
               --start-spread seconds and its next message is sent --think seconds (mean of an
               exponential draw, seeded: the same for every mode) after its reply arrived. The
               engine is not saturated, so a turn's TTFT is mostly its own prefill.
  saturated    every conversation's first message at t = 0 and the next one as soon as the
               reply arrives (no think time): the engine is always busy and TTFT is mostly
               queueing behind the other conversations.

Modes (each a fresh engine on the same weights and the same arrivals):
  recompute    no tier: what the pool's prefix cache still holds is reused, the rest of the
               history is prefilled again; a preempted request is recomputed
  swap         a host tier that only takes preempted requests' blocks (swap, not recompute)
  tier         kv_offload="cpu": evicted prefix blocks go to host memory and come back for the
               next turn, layer by layer on a worker thread while the layers before compute;
               preempted requests are swapped (preemption="auto": the cost model)
  tier-sync    the same without the overlap (kv_prefetch=False): every block is copied in
               before the step, on the engine's thread
  disk         kv_offload="disk" with a host tier of an eighth of the workload: most reused
               blocks come from memory-mapped files
  disk-restart a new engine on the disk mode's directory replays the workload: its prefixes
               (every turn's history) are found on disk from the start (run it together with
               disk, or give both runs the same --disk-dir)

Per turn: TTFT p50/p99 (from the message's arrival, so queueing counts), and per mode the
decode tokens/s of each request ((tokens - 1) / (last - first token)), generated tokens per
second of engine time, prefilled tokens, bytes moved each way and the time the engine thread
waited on a copy. Greedy replies are compared with the recompute mode's (SHA-256 of each
reply's token ids, so runs merged from several invocations compare too).

The peer: llama.cpp (llama-cpp-python) serves one sequence at a time. Through
create_completion with set_cache(LlamaRAMCache) or set_cache(LlamaDiskCache) a prompt whose
prefix was seen resumes from the saved state (the cache is consulted on the way in and
written after each reply). It replays the same prompts (token ids) turn by turn, one request
at a time (no think time, no queue): TTFT per turn with no cache, the RAM and the disk cache
(--peer-conversations of the conversations, it is serial).

One invocation runs the --modes given (and the peer unless --peer-conversations 0) and merges
them into --out: a mode already there is replaced, others are kept; the workload settings must
equal the file's (else it starts over). Each invocation records its machine load.
Results: benchmarks/results/kv_offload.json and .png.
Run (each under the exclusive lock):
  /tmp/qb .venv/bin/python benchmarks/kv_offload.py --scenario closed-loop --modes recompute --peer-conversations 0
  ... --modes swap,tier / --modes disk,disk-restart / --modes tier-sync ...
  /tmp/qb .venv/bin/python benchmarks/kv_offload.py --scenario saturated --modes recompute,swap,tier,tier-sync,disk,disk-restart
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SYSTEM = "You are a well-read assistant. Answer questions about the document in one or two sentences."
MODES = ("recompute", "swap", "tier", "tier-sync", "disk", "disk-restart")
SCENARIOS = ("closed-loop", "saturated")
WORKLOAD_KEYS = ("conversations", "turns", "reply_tokens", "doc_tokens", "think", "start_spread", "pool_fraction",
                 "max_num_seqs", "threads", "seed")


def workload(n_conv: int, n_turns: int, doc_tokens: int, tok: Any, seed: int) -> tuple[list[str], list[list[str]]]:
    """Per conversation a system message with its document (consecutive lines of Tiny
    Shakespeare, about ``doc_tokens`` tokens) and ``n_turns`` questions quoting its lines (a
    fixed fallback text when the data set is not there)."""
    import numpy as np

    path = common.find_file("shakespeare/input.txt", common.default_data_dir(existing_only=True))
    text = path.read_text() if path else ("To be, or not to be, that is the question.\n" * 400)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    rng = np.random.default_rng(seed)
    systems, questions = [], []
    for _ in range(n_conv):
        i = int(rng.integers(0, len(lines) - 200))
        doc: list[str] = []
        while len(tok.encode("\n".join(doc))) < doc_tokens:
            doc.append(lines[i + len(doc)])
        systems.append(f"{SYSTEM}\n\nDocument:\n" + "\n".join(doc))
        picks = rng.choice(len(doc), size=n_turns)
        questions.append([f"What does this line mean: \"{doc[int(j)]}\"" for j in picks])
    return systems, questions


def arrivals(args: argparse.Namespace) -> tuple[list[float], list[list[float]]]:
    """Start offsets and think times (seconds), seeded: the same for every mode."""
    import numpy as np

    n, t = args.conversations, args.turns
    if args.scenario == "saturated":
        return [0.0] * n, [[0.0] * t for _ in range(n)]
    rng = np.random.default_rng(args.seed + 1)
    starts = sorted(float(x) for x in rng.uniform(0, args.start_spread, n))
    think = [[float(np.clip(rng.exponential(args.think), 0.2 * args.think, 3 * args.think)) for _ in range(t)] for _ in range(n)]
    return starts, think


def digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def run_mode(mode: str, args: argparse.Namespace, ckpt: Any, conv: tuple[list[str], list[list[str]]], disk_dir: Path,
             num_blocks: int, host_gib: float) -> dict[str, Any]:
    """Drive one engine through the conversations; per-request records and the tier counters."""
    from mlsyskit.engine import LLM, SamplingParams

    kw: dict[str, Any] = {"num_kv_blocks": num_blocks, "max_num_seqs": args.max_num_seqs}
    if mode == "recompute":
        kw.update(preemption="recompute")
    elif mode == "swap":
        kw.update(kv_offload="cpu", kv_offload_gib=host_gib, preemption="swap", kv_tier_prefix=False)
    elif mode in ("tier", "tier-sync"):
        kw.update(kv_offload="cpu", kv_offload_gib=host_gib, kv_prefetch=mode == "tier")
    else:
        kw.update(kv_offload="disk", kv_offload_gib=host_gib / 8, kv_offload_dir=disk_dir)
    llm = LLM(ckpt, **kw)
    eng = llm.engine
    params = SamplingParams(max_tokens=args.reply_tokens, temperature=0, ignore_eos=True)
    systems, questions = conv
    n_conv, n_turns = len(systems), args.turns
    starts, think = arrivals(args)
    history: list[list[dict[str, str]]] = [[{"role": "system", "content": s}] for s in systems]
    turn = [0] * n_conv
    t0 = time.perf_counter()
    arrival: list[float | None] = [t0 + s for s in starts]  # next message's arrival (None: in flight/done)
    inflight: dict[str, tuple[int, int, float, int]] = {}
    records: list[dict[str, Any]] = []
    busy = 0.0
    while len(records) < n_conv * n_turns:
        now = time.perf_counter()
        for c in range(n_conv):
            if arrival[c] is not None and arrival[c] <= now:
                history[c].append({"role": "user", "content": questions[c][turn[c]]})
                ids = llm.chat_prompt(history[c])
                rid = eng.add_request(ids, params, request_id=f"{c}-{turn[c]}")
                inflight[rid] = (c, turn[c], arrival[c], len(ids))
                arrival[c] = None
        if not eng.has_unfinished():
            nxt = min(a for a in arrival if a is not None)
            time.sleep(max(0.0, min(0.05, nxt - time.perf_counter())))
            continue
        s0 = time.perf_counter()
        outs = eng.step()
        busy += time.perf_counter() - s0
        for o in outs:
            if not o.finished:
                continue
            c, k, arr, plen = inflight.pop(o.request_id)
            history[c].append({"role": "assistant", "content": llm.tokenizer.decode(o.token_ids)})
            n = len(o.token_ids)
            records.append({
                "conv": c, "turn": k, "prompt_tokens": plen, "cached_tokens": o.num_prefix_cached_tokens,
                "ttft_s": o.first_token_time - arr, "preemptions": o.num_preemptions,
                "decode_tok_s": (n - 1) / (o.finish_time - o.first_token_time) if n > 1 and o.finish_time > o.first_token_time else None,
                "token_ids": o.token_ids,
            })
            turn[c] += 1
            if turn[c] < n_turns:
                arrival[c] = time.perf_counter() + think[c][k]
    wall = time.perf_counter() - t0
    usage = eng.kv_usage()
    llm.close()
    gen = sum(len(r["token_ids"]) for r in records)
    return {"records": records, "wall_s": wall, "engine_busy_s": busy, "generated_tokens": gen,
            "tokens_computed": eng.tokens_computed, "kv_usage": usage, "engine_kwargs": {k: str(v) for k, v in kw.items()}}


def summarize(name: str, run: dict[str, Any], n_turns: int) -> dict[str, Any]:
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
    later = [r["ttft_s"] for r in recs if r["turn"] > 0]
    return {
        "mode": name, "per_turn": per_turn,
        "ttft_p50_turns_2plus_s": common.percentile(later, 50), "ttft_p99_turns_2plus_s": common.percentile(later, 99),
        "decode_tok_s_p50": common.percentile(dec, 50),
        "throughput_tok_per_engine_s": round(run["generated_tokens"] / run["engine_busy_s"], 2),
        "throughput_tok_per_wall_s": round(run["generated_tokens"] / run["wall_s"], 2),
        "engine_utilization": round(run["engine_busy_s"] / run["wall_s"], 3),
        "wall_s": round(run["wall_s"], 2), "engine_busy_s": round(run["engine_busy_s"], 2),
        "tokens_computed": run["tokens_computed"], "generated_tokens": run["generated_tokens"],
        "bytes_moved": {k.removeprefix("tier_"): u[k] for k in u if k.startswith("tier_bytes")},
        "copy_wait_s": round(u.get("tier_copy_wait_s", 0.0), 4),
        "copy_s": round(u.get("tier_copy_s", 0.0), 4),
        "load_wait_s": round(u.get("tier_load_wait_s", 0.0), 4),
        "preemptions": u.get("preemptions"), "preemptions_swapped": u.get("preemptions_swapped"),
        "hit_rate_cpu": u.get("tier_cpu_hit_rate"), "hit_rate_disk": u.get("tier_disk_hit_rate"),
        "tier_hit_tokens": u.get("tier_hit_tokens"), "prefix_hit_rate": round(u["prefix_hit_rate"], 4),
        "engine_kwargs": run["engine_kwargs"],
        "reply_digests": {f"{r['conv']}-{r['turn']}": digest(r["token_ids"]) for r in recs},
    }


def compare(scenario: dict[str, Any]) -> None:
    """Ratios and reply equality of every mode against the scenario's recompute mode."""
    modes = scenario["modes"]
    base = modes.get("recompute")
    if base is None:
        return
    for s in modes.values():
        s["speedup_ttft_p50_turns_2plus"] = round(base["ttft_p50_turns_2plus_s"] / s["ttft_p50_turns_2plus_s"], 2)
        s["speedup_ttft_p99_turns_2plus"] = round(base["ttft_p99_turns_2plus_s"] / s["ttft_p99_turns_2plus_s"], 2)
        s["speedup_ttft_p50_per_turn"] = [round(b["ttft_p50_s"] / p["ttft_p50_s"], 2)
                                          for b, p in zip(base["per_turn"], s["per_turn"], strict=True)]
        s["decode_tok_s_ratio"] = round(s["decode_tok_s_p50"] / base["decode_tok_s_p50"], 3)
        s["throughput_ratio"] = round(s["throughput_tok_per_engine_s"] / base["throughput_tok_per_engine_s"], 3)
        ref, got = base["reply_digests"], s["reply_digests"]
        s["replies_equal_to_recompute"] = f"{sum(ref.get(k) == v for k, v in got.items())}/{len(got)}"


def run_peer(args: argparse.Namespace, gguf: Path, prompts: list[list[list[int]]]) -> dict[str, Any]:
    """llama.cpp, one request at a time, turn by turn, through create_completion (the path
    that consults the cache set with set_cache): no cache, LlamaRAMCache, LlamaDiskCache."""
    from llama_cpp import Llama, LlamaDiskCache, LlamaRAMCache

    out: dict[str, Any] = {}
    n_turns = len(prompts[0])
    for cache in ("none", "ram", "disk"):
        llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                    n_batch=512, verbose=False)
        tmp = None
        if cache == "ram":
            llm.set_cache(LlamaRAMCache(capacity_bytes=2 << 30))
        elif cache == "disk":
            tmp = tempfile.mkdtemp(prefix="kv_offload_llamacpp_")
            llm.set_cache(LlamaDiskCache(cache_dir=tmp, capacity_bytes=2 << 30))
        llm.verbose = cache != "none"  # create_completion then says "cache hit" / "cache miss"
        ttft: dict[int, list[float]] = {k: [] for k in range(n_turns)}
        log = io.StringIO()
        t_all = time.perf_counter()
        for k in range(n_turns):
            for conv in prompts:
                t0 = time.perf_counter()
                n = 0
                with contextlib.redirect_stderr(log):  # LlamaDiskCache prints on every write
                    for _chunk in llm.create_completion(conv[k], max_tokens=args.reply_tokens, temperature=0.0, top_k=1,
                                                        top_p=1.0, min_p=0.0, repeat_penalty=1.0, stream=True):
                        if n == 0:
                            ttft[k].append(time.perf_counter() - t0)
                        n += 1
        later = [t for k in range(1, n_turns) for t in ttft[k]]
        out["llamacpp" if cache == "none" else f"llamacpp_{cache}cache"] = {
            "per_turn_ttft_p50_s": [common.percentile(ttft[k], 50) for k in range(n_turns)],
            "per_turn_ttft_p99_s": [common.percentile(ttft[k], 99) for k in range(n_turns)],
            "ttft_p50_turns_2plus_s": common.percentile(later, 50),
            "ttft_p99_turns_2plus_s": common.percentile(later, 99),
            "wall_s": round(time.perf_counter() - t_all, 2),
            "cache_hits": log.getvalue().count("_create_completion: cache hit"),
            "cache_misses": log.getvalue().count("_create_completion: cache miss"),
        }
        del llm
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = out["llamacpp"]["ttft_p50_turns_2plus_s"]
    for p in out.values():
        p["speedup_ttft_p50_turns_2plus"] = round(base / p["ttft_p50_turns_2plus_s"], 2)
    out["conversations"] = len(prompts)
    out["note"] = ("serial replay (one request at a time, no queue), the same prompts as the engine; "
                   "compare the cache's speedup over no cache, not absolute TTFT against the engine's scenarios")
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    scen = [s for s in SCENARIOS if s in result["scenarios"]]
    fig, axes = plt.subplots(1, len(scen) + 1, figsize=(6 * (len(scen) + 1), 4.5))
    for ax, name in zip(axes, scen, strict=False):
        for m in result["scenarios"][name]["modes"].values():
            turns = [p["turn"] for p in m["per_turn"]]
            ax.plot(turns, [p["ttft_p50_s"] * 1000 for p in m["per_turn"]], marker="o", label=m["mode"],
                    color=f"C{MODES.index(m['mode'])}")
        if name == "closed-loop":
            for pname, p in result.get("peer", {}).items():
                if isinstance(p, dict) and "per_turn_ttft_p50_s" in p:
                    ax.plot(range(1, len(p["per_turn_ttft_p50_s"]) + 1), [t * 1000 for t in p["per_turn_ttft_p50_s"]],
                            linestyle="--", marker="x", label=f"{pname} (serial)", color=f"C{len(MODES) + len(ax.lines) % 3}")
        ax.set_xlabel("turn")
        ax.set_ylabel("TTFT p50 (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{name}: time to first token per turn")
    ax = axes[-1]
    width = 0.8 / max(1, len(scen))
    names = [m for m in MODES if any(m in result["scenarios"][n]["modes"] for n in scen)]
    for i, name in enumerate(scen):
        ms = result["scenarios"][name]["modes"]
        xs = [j for j, m in enumerate(names) if m in ms]
        ax.bar([j + i * width for j in xs], [ms[names[j]]["decode_tok_s_p50"] for j in xs], width, label=name)
    ax.set_xticks([j + width * (len(scen) - 1) / 2 for j in range(len(names))], names, fontsize=8)
    ax.set_ylabel("decode tok/s per request (p50)")
    ax.set_title("decode speed")
    ax.legend(fontsize=8)
    fig.suptitle(result["title"], fontsize=9)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=SCENARIOS, default="closed-loop")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=160, help="tokens of each conversation's document")
    ap.add_argument("--think", type=float, default=45.0, help="mean seconds between a reply and the next message (closed-loop)")
    ap.add_argument("--start-spread", type=float, default=45.0, help="conversations start within this many seconds (closed-loop)")
    ap.add_argument("--pool-fraction", type=float, default=0.25, help="the pool holds this share of the conversations at their longest")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--peer-conversations", type=int, default=4, help="0: no llama.cpp peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--disk-dir", help="the disk tier's directory, kept (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(common.RESULTS / "kv_offload.json"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 conversations x 3 turns")
    args = common.parse_with_quick(ap, argv, {"conversations": 4, "turns": 3, "peer_conversations": 1, "think": 0.5,
                                              "start_spread": 0.5, "doc_tokens": 60})
    modes = common.split_names(args.modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}; use {', '.join(MODES)}")
    if "disk-restart" in modes and "disk" not in modes and not args.disk_dir:
        ap.error("disk-restart replays the disk mode's directory: give disk too, or --disk-dir of an earlier disk run")
    import torch

    from mlsyskit.engine import load_checkpoint
    from mlsyskit.engine.kv_cost import kv_bytes_per_token
    from mlsyskit.models.checkpoint import default_model_path

    torch.set_num_threads(args.threads)
    gguf = Path(default_model_path())
    ckpt = load_checkpoint(gguf)
    cfg, tok = ckpt.config, ckpt.tokenizer
    conv = workload(args.conversations, args.turns, args.doc_tokens, tok, args.seed)
    # the longest conversation's context: document + every message + every reply (an upper bound)
    longest = max(len(tok.encode(s)) + sum(len(tok.encode(q)) + 12 for q in qs) + args.turns * (args.reply_tokens + 6)
                  for s, qs in zip(*conv, strict=True))
    block = 16
    num_blocks = max(-(-longest // block) + 1, int(args.conversations * args.pool_fraction * -(-longest // block)))
    kvb = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 2)
    host_gib = max(0.05, 1.5 * args.conversations * longest * kvb / 2**30)  # the whole workload fits
    common.log(f"{args.scenario}: {args.conversations} conversations x {args.turns} turns, longest context ~{longest} tokens, "
               f"pool {num_blocks} blocks of {block} ({num_blocks * block * kvb / 2**20:.1f} MiB), host tier {host_gib * 1024:.0f} MiB")
    disk_dir = Path(args.disk_dir) if args.disk_dir else Path(tempfile.mkdtemp(prefix="kv_offload_bench_"))
    if args.disk_dir and "disk" in modes:
        shutil.rmtree(disk_dir, ignore_errors=True)  # the disk mode starts from an empty tier
    invocation = {"modes": modes, "scenario": args.scenario, "loadavg_before": common.loadavgs(), "stamp": common.run_stamp()}
    runs: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            common.log(f"mode {mode} ... (load {common.loadavgs()})")
            runs[mode] = run_mode(mode, args, ckpt, conv, disk_dir, num_blocks, host_gib)
            common.log(f"  {mode}: {runs[mode]['wall_s']:.1f} s wall, {runs[mode]['engine_busy_s']:.1f} s engine, "
                       f"{runs[mode]['tokens_computed']} tokens computed")
    finally:
        if not args.disk_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)
    peer: dict[str, Any] | None = None
    if args.peer_conversations > 0:
        common.log("peer: llama.cpp with no cache, its RAM and its disk prompt cache ...")
        try:
            hist_runs = runs.get("recompute") or next(iter(runs.values()), None)
            if hist_runs is None:
                raise SystemExit("the peer replays a mode's replies: give at least one mode")
            by = {(r["conv"], r["turn"]): r for r in hist_runs["records"]}
            prompts = []
            for c in range(min(args.peer_conversations, args.conversations)):
                hist = [{"role": "system", "content": conv[0][c]}]
                turns = []
                for k in range(args.turns):
                    hist.append({"role": "user", "content": conv[1][c][k]})
                    turns.append(tok.encode(tok.apply_chat_template(hist, add_generation_prompt=True), add_bos=False))
                    hist.append({"role": "assistant", "content": tok.decode(by[(c, k)]["token_ids"])})
                prompts.append(turns)
            peer = run_peer(args, gguf, prompts)
        except ImportError as e:
            peer = {"skipped": f"llama-cpp-python is not installed ({e})"}
    invocation["loadavg_after"] = common.loadavgs()

    cfg_now = {k: getattr(args, k) for k in WORKLOAD_KEYS} | {
        "num_kv_blocks": num_blocks, "block_size": block, "longest_context_tokens": longest,
        "host_tier_gib": round(host_gib, 3), "kv_bytes_per_token": kvb, "model": gguf.name}
    out_path = Path(args.out)
    result: dict[str, Any] = {}
    if out_path.is_file():
        try:
            result = json.loads(out_path.read_text())
        except ValueError:
            result = {}
    old = result.get("config", {})
    if any(old.get(k) != v for k, v in cfg_now.items() if k not in ("think", "start_spread")) or "scenarios" not in result:
        result = {"scenarios": {}, "invocations": []}  # another workload: start over
    scen = result["scenarios"].setdefault(args.scenario, {"modes": {}})
    if args.scenario == "closed-loop":
        scen["think_mean_s"], scen["start_spread_s"] = args.think, args.start_spread
    for m in modes:
        scen["modes"][m] = summarize(m, runs[m], args.turns)
    scen["modes"] = {m: scen["modes"][m] for m in MODES if m in scen["modes"]}
    compare(scen)
    if peer is not None:
        result["peer"] = peer
    result["invocations"].append(invocation)
    result.update({
        "title": f"KV tiers, SmolLM2-135M native: {args.conversations} conversations x {args.turns} turns "
                 f"(~{args.doc_tokens}-token document each), pool for {args.pool_fraction:.0%} of them, {args.threads} thread(s)",
        "config": {**cfg_now, "think": args.think, "start_spread": args.start_spread},
        "machine": {**common.platform_info(), "cpu_model": common.cpu_model(), "cpus": common.usable_cpus()},
    })
    out = common.write_json(out_path, result)
    plot(result, out.with_suffix(".png"))
    for m in modes:
        s = scen["modes"][m]
        common.log(f"{args.scenario} {m:>12}: TTFT p50 turns 2+ {s['ttft_p50_turns_2plus_s'] * 1000:.0f} ms "
                   f"(x{s.get('speedup_ttft_p50_turns_2plus', '-')}), p99 {s['ttft_p99_turns_2plus_s'] * 1000:.0f} ms, "
                   f"decode {s['decode_tok_s_p50']} tok/s, util {s['engine_utilization']}, computed {s['tokens_computed']}, "
                   f"copy wait {s['copy_wait_s']} s, equal {s.get('replies_equal_to_recompute', '-')}")
    if peer is not None:
        common.log(f"peer: {json.dumps(peer)}")
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
