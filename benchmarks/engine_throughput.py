"""LLM serving on SmolLM2-135M: mlsyskit's engine vs its naive modes, transformers and llama.cpp.

One run, one process, the same prompts (as token ids) for every system, 2 threads each:

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

The systems (--systems):
  ours         mlsyskit.engine.LLM: paged KV cache, continuous batching, chunked prefill
  ours_static  the same engine with batching="static" (a batch of up to max_num_seqs is admitted
               only when the previous one has completely finished)
  ours_naive   the same engine with kv_cache=False (recomputes the whole sequence every token):
               quadratic, so it runs a reduced workload (--naive-requests, --naive-max-tokens,
               arriving together; ours runs the same reduced workload next to it for the ratio)
               and a shorter batch-1 decode (--naive-decode-tokens, first round only)
  hf           transformers AutoModelForCausalLM on the same GGUF dequantized to fp32 (what
               ours runs), generate() greedy, one request at a time in arrival order
  hf_batch8    (extra, not in the default set) transformers generate() on left-padded batches
               of up to 8 waiting requests, each batch running to completion
  llamacpp     llama.cpp through llama-cpp-python on the same Q4_1 GGUF (n_threads=2), one
               request at a time in arrival order (it serves one sequence at a time)

The Poisson rate (--rate, requests/s) defaults to --rate-factor x the request rate the fastest
one-by-one baseline (llama.cpp, else transformers) sustained in this run's all-together phase,
so the baselines are overloaded and ours is loaded. The engine-based systems serve the stream
live; the one-at-a-time systems are by default replayed (--replay-poisson): their measured
per-request service times from the all-together phase go through a FIFO queue with the same
arrival times, which is what a single-sequence server does. Every measurement of ours starts
from a fresh engine (same weights), so no phase profits from the prefix cache of an earlier one.
OMP_WAIT_POLICY=PASSIVE is set for all systems (--omp-wait-policy): on this shared machine
spinning OpenMP threads made llama.cpp's decode 3-4x and torch's prefill up to ~7x slower.
Greedy outputs are compared token by token
(ours vs transformers: same fp32 weights, so they should match; mismatches late in long
generations can come from fp rounding and are reported with the first divergence position).

Results: benchmarks/results/engine_throughput.json and a bar chart next to it (.png).
Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/engine_throughput.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the Hugging Face hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "engine_throughput.json"

SYSTEMS = ("ours", "ours_static", "ours_naive", "hf", "hf_batch8", "llamacpp")
DEFAULT_SYSTEMS = ("ours", "ours_static", "ours_naive", "hf", "llamacpp")
ONE_BY_ONE = ("hf", "llamacpp")
LABELS = {
    "ours": "mlsyskit engine (paged KV, continuous batching)",
    "ours_static": "mlsyskit engine, batching='static'",
    "ours_naive": "mlsyskit engine, kv_cache=False (reduced workload)",
    "hf": "transformers generate, one request at a time",
    "hf_batch8": "transformers generate, left-padded static batches of <= 8",
    "llamacpp": "llama.cpp (llama-cpp-python), one request at a time",
}

# Goals from the issue.
GOAL_BATCH1_VS_LLAMACPP = 1.0
GOAL_THROUGHPUT_VS_HF = 3.0
GOAL_THROUGHPUT_VS_LLAMACPP = 3.0

# --quick: a smoke run (explicit flags still win)
QUICK = {
    "requests": 8, "prompt_len": [16, 128], "output_len": [8, 32], "decode_tokens": 32, "decode_reps": 1,
    "naive_requests": 2, "naive_max_tokens": 4, "naive_decode_tokens": 8,
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


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int


def load_text(data_dir: str | None) -> tuple[str, str]:
    candidates = []
    if data_dir:
        candidates.append(Path(data_dir) / "shakespeare" / "input.txt")
    candidates.append(Path("/work/shared/data/shakespeare/input.txt"))
    candidates.append(REPO.parent / "shared" / "data" / "shakespeare" / "input.txt")
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8"), str(c)
    return FALLBACK_TEXT * 400, "built-in paragraph (Tiny Shakespeare not found)"


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
    prompt_lens = rng.integers(plo, phi + 1, size=args.requests)
    out_lens = rng.integers(olo, ohi + 1, size=args.requests)
    requests = [Request(cut_prompt(text, encode, rng, int(p)), int(o)) for p, o in zip(prompt_lens, out_lens, strict=True)]
    decode_prompt = cut_prompt(text, encode, rng, args.decode_prompt_tokens)
    warm_prompt = cut_prompt(text, encode, rng, 96)
    gaps = np.random.default_rng(args.seed + 1).exponential(1.0, size=args.requests)
    unit_arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])  # rate 1; scaled by 1/rate later
    return {
        "requests": requests,
        "decode_prompt": decode_prompt,
        "warm_prompt": warm_prompt,
        "unit_arrivals": unit_arrivals,
    }


# --------------------------------------------------------------------------------------
# Result bookkeeping
# --------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


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
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_mean_s": round(float(np.mean(ttft)), 4) if ttft else None,
        "e2e_p50_s": pct(e2e, 50),
        "e2e_p99_s": pct(e2e, 99),
        "per_request": [
            {"arrival_s": round(r["arrival"], 4), "ttft_s": round(r["first"] - r["arrival"], 4),
             "e2e_s": round(r["finish"] - r["arrival"], 4), "new_tokens": len(r["tokens"])}
            for r in records
        ],
    }


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------------------
# Systems: a batch-1 generator and a way to serve a list of requests with arrival times
# --------------------------------------------------------------------------------------


class System:
    name = ""
    streams = False  # serves many sequences at once (gets the arrival stream itself)

    def reset(self) -> None:
        """Forget everything cached from earlier requests (called before every measurement)."""

    def generate1(self, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
        """One request alone: (start, first token, last token) perf_counter times, token ids."""
        raise NotImplementedError

    def serve(self, reqs: list[Request], arrivals: np.ndarray) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        """Serve requests arriving at ``arrivals`` (s from the start): per-request records, wall
        time from first submission to last completion, extra stats. The default serves them one
        at a time in arrival order (what a single-sequence server does)."""
        t0 = time.perf_counter()
        records: list[dict[str, Any]] = []
        for i in np.argsort(arrivals, kind="stable"):
            wait = t0 + arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            start, first, last, toks = self.generate1(reqs[i].prompt_ids, reqs[i].max_tokens)
            records.append({"i": int(i), "arrival": float(arrivals[i]), "start": start - t0,
                            "first": first - t0, "finish": last - t0, "tokens": toks})
        records.sort(key=lambda r: r["i"])
        return records, max(r["finish"] for r in records), {}


class Ours(System):
    streams = True

    def __init__(self, name: str, ckpt: Any, engine_kwargs: dict[str, Any]) -> None:
        from mlsyskit.engine import LLM

        self.name = name
        self.ckpt = ckpt
        self.engine_kwargs = engine_kwargs
        self.llm = LLM(ckpt, **engine_kwargs)
        self.warm_prompt: list[int] | None = None

    def reset(self) -> None:
        """A fresh engine (same weights): otherwise the prefix cache would still hold the KV of
        prompts seen in an earlier phase and the next phase would skip their prefill."""
        from mlsyskit.engine import LLM

        self.llm = None  # free the old KV pool first
        self.llm = LLM(self.ckpt, **self.engine_kwargs)
        if self.warm_prompt:
            self.llm.generate([self.warm_prompt], self._params(2))

    def _params(self, n: int) -> Any:
        from mlsyskit.engine import SamplingParams

        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def generate1(self, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
        start = time.perf_counter()
        out = self.llm.generate([ids], self._params(n))[0]
        return start, out.first_token_time, out.finish_time, list(out.token_ids)

    def serve(self, reqs: list[Request], arrivals: np.ndarray) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        eng = self.llm.engine
        steps0, pre0, comp0 = eng.num_steps, eng.scheduler.num_preemptions, eng.tokens_computed
        order = list(np.argsort(arrivals, kind="stable"))
        rid_to_i: dict[str, int] = {}
        outs: dict[int, Any] = {}
        peak_running = 0
        t0 = time.perf_counter()
        k = 0
        while k < len(order) or eng.has_unfinished():
            now = time.perf_counter()
            while k < len(order) and t0 + arrivals[order[k]] <= now:
                i = int(order[k])
                rid = eng.add_request(reqs[i].prompt_ids, self._params(reqs[i].max_tokens))
                eng.requests[rid].out.arrival_time = t0 + float(arrivals[i])  # TTFT counts queueing
                rid_to_i[rid] = i
                k += 1
            if eng.has_unfinished():
                for out in eng.step():
                    if out.finished:
                        outs[rid_to_i[out.request_id]] = out
                peak_running = max(peak_running, len(eng.scheduler.running))
            elif k < len(order):
                time.sleep(max(0.0, t0 + float(arrivals[order[k]]) - time.perf_counter()))
        records = [
            {"i": i, "arrival": o.arrival_time - t0, "first": o.first_token_time - t0,
             "finish": o.finish_time - t0, "tokens": list(o.token_ids)}
            for i, o in sorted(outs.items())
        ]
        extra = {
            "engine_steps": eng.num_steps - steps0,
            "preemptions": eng.scheduler.num_preemptions - pre0,
            "tokens_computed": eng.tokens_computed - comp0,
            "peak_running_seqs": peak_running,
        }
        return records, max(r["finish"] for r in records), extra


class _Clock:
    """A transformers streamer that only timestamps each generated step (the first put() is
    the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HF(System):
    def __init__(self, name: str, gguf: Path, batch: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        self.name = name
        self.batch = batch
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # No EOS at all: generation never stops early and never suppresses EOS, which is what
        # ignore_eos means for the other systems (min_new_tokens would mask EOS instead). A None
        # in a passed GenerationConfig is filled from the model's, so clear the model's too.
        self.model.generation_config.eos_token_id = None
        self.gen_config_cls = GenerationConfig
        self.clock_cls = type("Clock", (_Clock, BaseStreamer), {})

    def _generate(self, batch_ids: list[list[int]], n: int) -> tuple[float, list[float], list[list[int]]]:
        torch = self.torch
        width = max(len(x) for x in batch_ids)
        ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in batch_ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids])
        clock = self.clock_cls()
        cfg = self.gen_config_cls(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=self.pad_id)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, streamer=clock)
        new = out[:, width:].tolist()
        return start, clock.times, new

    def generate1(self, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
        start, times, new = self._generate([ids], n)
        return start, times[0], times[-1], new[0]

    def serve(self, reqs: list[Request], arrivals: np.ndarray) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        if self.batch == 1:
            return super().serve(reqs, arrivals)
        # Static batching: whenever the server is free, take up to `batch` waiting requests
        # (at least the next one), left-pad them and run generate() until the longest is done.
        order = list(np.argsort(arrivals, kind="stable"))
        t0 = time.perf_counter()
        records: list[dict[str, Any]] = []
        k = 0
        while k < len(order):
            wait = t0 + arrivals[order[k]] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            now = time.perf_counter() - t0
            group = [int(order[k])]
            k += 1
            while k < len(order) and len(group) < self.batch and arrivals[order[k]] <= now:
                group.append(int(order[k]))
                k += 1
            n = max(reqs[i].max_tokens for i in group)
            _, times, new = self._generate([reqs[i].prompt_ids for i in group], n)
            done = time.perf_counter() - t0  # results come back when generate() returns
            for row, i in enumerate(group):
                records.append({"i": i, "arrival": float(arrivals[i]), "first": times[0] - t0,
                                "finish": done, "tokens": new[row][: reqs[i].max_tokens]})
        records.sort(key=lambda r: r["i"])
        return records, max(r["finish"] for r in records), {"batch": self.batch}


class LlamaCpp(System):
    def __init__(self, name: str, gguf: Path, threads: int, seed: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.name = name
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, seed=seed, verbose=False)

    def generate1(self, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
        self.llm.reset()  # no KV reuse between requests (prompts do not share prefixes anyway)
        toks: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        # generate() never stops on EOS by itself: we stop after n tokens (= ignore_eos).
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) >= n:
                break
        return start, times[0], times[-1], toks


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


def decode_round(systems: dict[str, System], wl: dict[str, Any], args: argparse.Namespace, rnd: int) -> dict[str, dict[str, Any]]:
    # hf_batch8's batch-1 generate() is hf's; kv_cache=False (slow) runs in the first round only
    names = [n for n in systems if n != "hf_batch8" and (n != "ours_naive" or rnd == 0)]
    shift = rnd % len(names)
    names = names[shift:] + names[:shift]
    res = {}
    for name in names:
        n = args.naive_decode_tokens if name == "ours_naive" else args.decode_tokens
        systems[name].reset()
        la = loadavg()
        start, first, last, toks = systems[name].generate1(wl["decode_prompt"], n)
        res[name] = {
            "round": rnd, "new_tokens": len(toks), "prefill_s": round(first - start, 4),
            "decode_s": round(last - first, 4),
            "decode_tok_s": round((len(toks) - 1) / (last - first), 2) if last > first else None,
            "loadavg_1m": la, "tokens": toks,
        }
        print(f"  round {rnd} {name:12s} {res[name]['decode_tok_s']} tok/s decode "
              f"(prefill {res[name]['prefill_s']:.3f} s, load {la})", flush=True)
    return res


def run_serve(system: System, reqs: list[Request], arrivals: np.ndarray, tag: str) -> dict[str, Any]:
    system.reset()
    la0 = loadavg()
    records, wall, extra = system.serve(reqs, arrivals)
    res = summarize(records, wall)
    res.update(extra)
    res["loadavg_1m_before"], res["loadavg_1m_after"] = la0, loadavg()
    res["tokens"] = [r["tokens"] for r in records]
    print(f"  {tag:8s} {system.name:12s} {res['throughput_tok_s']:8.1f} tok/s  wall {res['wall_s']:7.1f} s  "
          f"TTFT p50 {res['ttft_p50_s']:.3f} p99 {res['ttft_p99_s']:.3f} s  (load {la0}->{res['loadavg_1m_after']})",
          flush=True)
    return res


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


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "tokenizers", "gguf", "llama_cpp_python", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def build_systems(names: list[str], args: argparse.Namespace, ckpt: Any, gguf: Path) -> tuple[dict[str, System], dict[str, Any]]:
    systems: dict[str, System] = {}
    info: dict[str, Any] = {}
    engine_kwargs = {
        "block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
        "prefix_caching": True, "paged": True, "dtype": "float32",
    }
    for name in names:
        t = time.perf_counter()
        try:
            if name == "ours":
                sys_: System = Ours(name, ckpt, dict(engine_kwargs, kv_cache=True, batching="continuous"))
            elif name == "ours_static":
                sys_ = Ours(name, ckpt, dict(engine_kwargs, kv_cache=True, batching="static", max_num_seqs=args.static_max_seqs))
            elif name == "ours_naive":
                sys_ = Ours(name, ckpt, dict(engine_kwargs, kv_cache=False, batching="continuous"))
            elif name == "hf":
                sys_ = HF(name, gguf, batch=1)
            elif name == "hf_batch8":
                hf = systems.get("hf")
                sys_ = HF.__new__(HF)
                if isinstance(hf, HF):  # share the loaded model
                    sys_.__dict__.update(hf.__dict__)
                else:
                    sys_ = HF(name, gguf)
                sys_.name, sys_.batch = name, args.hf_batch
            elif name == "llamacpp":
                sys_ = LlamaCpp(name, gguf, args.threads, args.seed, args.llama_n_ctx)
            else:
                raise ValueError(name)
        except ImportError as e:
            info[name] = {"skipped": True, "reason": f"{type(e).__name__}: {e}"}
            print(f"  {name}: skipped ({e})", flush=True)
            continue
        except Exception as e:  # a baseline that cannot load is reported, not fatal
            info[name] = {"skipped": True, "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            print(f"  {name}: FAILED to load ({e})", flush=True)
            continue
        load_s = time.perf_counter() - t
        info[name] = {"skipped": False, "load_s": round(load_s, 2)}
        if isinstance(sys_, Ours):
            info[name]["engine"] = sys_.engine_kwargs
            bm = sys_.llm.engine.block_manager
            info[name]["num_kv_blocks"] = bm.num_blocks if bm is not None else None
            info[name]["max_model_len"] = sys_.llm.engine.max_model_len
        systems[name] = sys_
        print(f"  loaded {name} in {load_s:.1f} s", flush=True)
    return systems, info


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.omp_wait_policy:  # before torch (and llama.cpp) start their OpenMP runtimes
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    args.prompt_len = [int(x) for x in args.prompt_len]
    args.output_len = [int(x) for x in args.output_len]
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        print(f"unknown systems {bad}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    import torch

    torch.set_num_threads(args.threads)
    from mlsyskit.engine import default_model_path, load_checkpoint

    gguf = Path(args.model) if args.model else default_model_path()
    print(f"[engine_throughput] model {gguf}; threads {args.threads}; load average {load_start[0]:.2f}", flush=True)
    ckpt = load_checkpoint(gguf)
    tok = ckpt.tokenizer
    text, text_source = load_text(args.data_dir)
    wl = make_workload(args, tok.encode, text)
    reqs: list[Request] = wl["requests"]

    print("[engine_throughput] loading systems", flush=True)
    systems, sys_info = build_systems(names, args, ckpt, gguf)

    # Tokenizers agree? (every system gets token ids, but the prompts came from our tokenizer)
    tok_check: dict[str, Any] = {}
    sample_texts = [tok.decode(r.prompt_ids) for r in reqs[: min(16, len(reqs))]]
    mine = [tok.encode(t) for t in sample_texts]
    if "hf" in systems or "hf_batch8" in systems:
        hf_tok = (systems.get("hf") or systems["hf_batch8"]).tokenizer  # type: ignore[attr-defined]
        tok_check["transformers_equal"] = sum(hf_tok(t, add_special_tokens=False)["input_ids"] == m for t, m in zip(sample_texts, mine, strict=True))
    if "llamacpp" in systems:
        lc = systems["llamacpp"].llm  # type: ignore[attr-defined]
        tok_check["llamacpp_equal"] = sum(lc.tokenize(t.encode(), add_bos=False, special=False) == m for t, m in zip(sample_texts, mine, strict=True))
    tok_check["compared"] = len(sample_texts)

    print("[engine_throughput] warm-up", flush=True)
    for n, s in systems.items():
        if isinstance(s, Ours):
            s.warm_prompt = wl["warm_prompt"]
        if n != "hf_batch8":
            s.generate1(wl["warm_prompt"], 8)

    # ---- phase 1: batch-1 decode, systems taking turns --------------------------------------
    print(f"[engine_throughput] batch-1 decode: {args.decode_prompt_tokens}-token prompt, "
          f"{args.decode_tokens} new tokens, {args.decode_reps} rounds", flush=True)
    rounds = [decode_round(systems, wl, args, r) for r in range(args.decode_reps)]
    results: dict[str, dict[str, Any]] = {n: dict(sys_info[n], label=LABELS[n]) for n in names}
    for n in systems:
        if n == "hf_batch8":
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
    together_order = [n for n in ("ours", "ours_static", "llamacpp", "hf", "hf_batch8") if n in systems]
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
    replay = {x.strip() for x in args.replay_poisson.split(",") if x.strip()}
    print(f"[engine_throughput] Poisson stream: {rate:.3f} requests/s ({basis}); last arrival at {arrivals[-1]:.1f} s", flush=True)
    for n in together_order:
        if n in ONE_BY_ONE and n in replay:
            results[n]["poisson"] = replay_fifo(results[n]["together"], arrivals)
            p = results[n]["poisson"]
            print(f"  poisson  {n:12s} replayed: TTFT p50 {p['ttft_p50_s']:.3f} p99 {p['ttft_p99_s']:.3f} s", flush=True)
        else:
            results[n]["poisson"] = run_serve(systems[n], reqs, arrivals, "poisson")
        time.sleep(args.settle)

    # ---- correctness ----------------------------------------------------------------------
    decode = tok.decode
    correctness: dict[str, Any] = {"tokenizers": tok_check}

    def toks(n: str, phase: str) -> list[list[int]] | None:
        return results.get(n, {}).get(phase, {}).get("tokens")

    pairs = [
        ("ours_vs_transformers_together", ("ours", "together"), ("hf", "together")),
        ("ours_vs_transformers_batch1", None, None),
        ("ours_vs_ours_static_together", ("ours", "together"), ("ours_static", "together")),
        ("ours_together_vs_ours_poisson", ("ours", "together"), ("ours", "poisson")),
        ("ours_vs_ours_naive_reduced", ("ours", "reduced"), ("ours_naive", "reduced")),
        ("transformers_vs_transformers_batch8", ("hf", "together"), ("hf_batch8", "together")),
        ("ours_vs_llamacpp_together (Q4_1 matmuls: not expected to match)", ("ours", "together"), ("llamacpp", "together")),
    ]
    for key, a, b in pairs:
        if a is None:
            if "ours" in systems and "hf" in systems:
                correctness[key] = compare_tokens([rounds[0]["ours"]["tokens"]], [rounds[0]["hf"]["tokens"]], decode)
            continue
        ta, tb = toks(*a), toks(*b)
        if ta and tb:
            correctness[key] = compare_tokens(ta, tb, decode)
    for n in results:
        for phase in ("together", "poisson", "reduced"):
            results[n].get(phase, {}).pop("tokens", None)

    # ---- goals ----------------------------------------------------------------------------
    goals = compute_goals(results, rounds)
    load_end = os.getloadavg()
    report: dict[str, Any] = {
        "benchmark": "engine_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)),
            "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
            "note": "shared, noisy 2-core machine: compare ratios measured in this run and the "
            "loadavg_1m recorded next to every measurement",
        },
        "model": {"path": str(gguf), "file_type": ckpt.file_type, "arch": ckpt.config.arch,
                  "n_layers": ckpt.config.n_layers, "dim": ckpt.config.dim, "vocab_size": ckpt.config.vocab_size,
                  "precision": "ours and transformers: the Q4_1 GGUF dequantized to fp32; llama.cpp: Q4_1 as stored"},
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
        "correctness": correctness,
        "goals": goals,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = out.with_suffix(".png")
    try:
        plot(results, goals, png)
    except Exception as e:  # the chart is a convenience
        print(f"could not draw the chart: {e}")
    print_table(report)
    print(f"\nwrote {out}" + (f" and {png}" if png.exists() else "") + f" in {report['total_wall_s']:.0f} s")
    return 0


def compute_goals(results: dict[str, dict[str, Any]], rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    if all(n in rounds[0] for n in ("ours", "llamacpp")):
        per = [r["ours"]["decode_tok_s"] / r["llamacpp"]["decode_tok_s"] for r in rounds]
        ratio = float(np.median(per))
        goals["batch1_decode_ours_over_llamacpp"] = {
            "goal": f">= {GOAL_BATCH1_VS_LLAMACPP}", "ratio": round(ratio, 3),
            "per_round": [round(x, 3) for x in per], "met": ratio >= GOAL_BATCH1_VS_LLAMACPP}
    ours_t = results.get("ours", {}).get("together", {}).get("throughput_tok_s")
    for key, other, goal in (("throughput_ours_over_transformers", "hf", GOAL_THROUGHPUT_VS_HF),
                             ("throughput_ours_over_llamacpp_one_by_one", "llamacpp", GOAL_THROUGHPUT_VS_LLAMACPP)):
        o = results.get(other, {}).get("together", {}).get("throughput_tok_s")
        if ours_t and o:
            g = {"goal": f">= {goal}", "ratio": round(ours_t / o, 3), "met": ours_t / o >= goal,
                 "ours_tok_s": ours_t, f"{other}_tok_s": o}
            po = results.get(other, {}).get("poisson", {}).get("throughput_tok_s")
            pu = results.get("ours", {}).get("poisson", {}).get("throughput_tok_s")
            if po and pu:
                g["poisson_ratio (info: bounded by the arrival rate)"] = round(pu / po, 3)
            goals[key] = g
    for n in ("ours_static", "hf_batch8"):
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
    print("\nsystem        batch1 dec  | together: tok/s  TTFT p50   p99   | poisson: tok/s  TTFT p50    p99")
    for n, r in res.items():
        if r.get("skipped"):
            print(f"{n:12s}  skipped: {r['reason'][:80]}")
            continue
        t = r.get("together") or r.get("reduced") or {}
        p = r.get("poisson", {})

        def f(x: Any, w: int, d: int = 1) -> str:
            return f"{x:{w}.{d}f}" if isinstance(x, int | float) else f"{'-':>{w}}"

        tag = " (reduced)" if "together" not in r and "reduced" in r else ""
        print(f"{n:12s} {f(r.get('decode_tok_s_batch1'), 9)}   | {f(t.get('throughput_tok_s'), 13)} "
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if not r.get("skipped")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"ours": "tab:green", "ours_static": "tab:olive", "ours_naive": "tab:gray", "hf": "tab:orange",
              "hf_batch8": "tab:brown", "llamacpp": "tab:blue"}
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about 2 min on an idle machine): 8 requests, prompts 16-128, outputs "
                   "8-32, 32-token batch-1 decode, 1 round, tiny kv_cache=False workload")
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
    p.add_argument("--hf-batch", type=int, default=8, help="hf_batch8: max requests per left-padded generate() batch (default: 8)")
    p.add_argument("--llama-n-ctx", type=int, default=2048, help="llama.cpp context size (default: 2048)")
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--data-dir", default=os.environ.get("MLSYSKIT_DATA_DIR") or None,
                   help="data dir holding shakespeare/input.txt (default: $MLSYSKIT_DATA_DIR, then /work/shared/data)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (prompts, lengths; arrivals use seed+1) (default: 0)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to pause between systems (default: 2)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report (the PNG goes next to it) (default: benchmarks/results/engine_throughput.json)")
    return p


if __name__ == "__main__":
    sys.exit(main())
