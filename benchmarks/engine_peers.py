"""The peers of engine_throughput.py: one class per system, each able to generate for one
request alone (batch-1 decode, prefill) and to serve a list of requests with arrival times.

  Ours      mlsyskit.engine.LLM: the GGUF's Q4_1/Q8_0 blocks run natively (default) or
            dequantized to fp32 (dtype="float32"); paged KV, continuous or static batching,
            kv_cache on/off
  HF        transformers generate() on the same GGUF dequantized to fp32, one request at a
            time or in left-padded static batches
  LlamaCpp  llama.cpp through llama-cpp-python on the GGUF as stored, one request at a time

Perplexity (``nll``) is computed by ours and llama.cpp on the same token windows. Heavy
libraries (the engine, transformers, llama_cpp) are imported when a system is built.
"""

from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import common


@dataclass
class Request:
    """One request of the workload: prompt token ids and the new tokens to generate."""

    prompt_ids: list[int]
    max_tokens: int


class System:
    """A system under test; the default serve() is a single-sequence server."""

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

    def nll(self, ids: list[int], window: int) -> tuple[float, int]:
        """Summed negative log-likelihood of each window's tokens 1.. given the ones before,
        over non-overlapping windows (one forward each, the engine's prefill path)."""
        import torch

        model = self.llm.engine.model
        total, n = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(ids) - 1, window):
                w = torch.tensor(ids[i : i + window])
                if len(w) < 2:
                    break
                logp = torch.log_softmax(model(w.unsqueeze(0))[0, :-1].double(), -1)
                total -= float(logp.gather(1, w[1:].unsqueeze(1)).sum())
                n += len(w) - 1
        return total, n


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
        self.gguf, self.threads, self.seed = gguf, threads, seed
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, seed=seed, verbose=False)

    def nll(self, ids: list[int], window: int) -> tuple[float, int]:
        """As Ours.nll, with llama.cpp's logits (a second context that keeps every position's)."""
        from llama_cpp import Llama

        lm = Llama(model_path=str(self.gguf), n_ctx=window, n_threads=self.threads, n_threads_batch=self.threads,
                   n_batch=window, seed=self.seed, logits_all=True, verbose=False)
        total, n = 0.0, 0
        for i in range(0, len(ids) - 1, window):
            w = ids[i : i + window]
            if len(w) < 2:
                break
            lm.reset()
            lm.eval(w)
            logits = np.asarray(lm.scores[: len(w) - 1], dtype=np.float64)
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
            n += len(w) - 1
        del lm
        return total, n

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


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_systems(names: list[str], args: argparse.Namespace, ckpts: dict[str, Any], gguf: Path) -> tuple[dict[str, System], dict[str, Any]]:
    """``ckpts``: "native" and "fp32" checkpoints of the GGUF (ours run from them; each reset
    builds a fresh engine from them). Per system: time to build it and the resident memory
    its construction and a short first generation added to this process."""
    systems: dict[str, System] = {}
    info: dict[str, Any] = {}
    engine_kwargs = {
        "block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
        "prefix_caching": True, "paged": True,
    }
    for name in names:
        t = time.perf_counter()
        rss0 = rss_mib()
        try:
            if name == "ours":
                sys_: System = Ours(name, ckpts["native"], dict(engine_kwargs, kv_cache=True, batching="continuous"))
            elif name == "ours_fp32":
                sys_ = Ours(name, ckpts["fp32"], dict(engine_kwargs, kv_cache=True, batching="continuous", dtype="float32"))
            elif name == "ours_static":
                sys_ = Ours(name, ckpts["native"], dict(engine_kwargs, kv_cache=True, batching="static", max_num_seqs=args.static_max_seqs))
            elif name == "ours_naive":
                sys_ = Ours(name, ckpts["native"], dict(engine_kwargs, kv_cache=False, batching="continuous"))
            elif name == "hf":
                sys_ = HF(name, gguf, batch=1)
            elif name == "hf_batch":
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
        if name != "hf_batch":
            sys_.generate1([1, 2, 3, 4], 2)  # touch the weights once
        info[name] = {"skipped": False, "build_s": round(load_s, 2), "rss_added_mib": round(rss_mib() - rss0, 1)}
        if isinstance(sys_, Ours):
            info[name]["engine"] = sys_.engine_kwargs
            bm = sys_.llm.engine.block_manager
            info[name]["num_kv_blocks"] = bm.num_blocks if bm is not None else None
            info[name]["max_model_len"] = sys_.llm.engine.max_model_len
            info[name]["fused_decode"] = sys_.llm.engine.runner.fused is not None
        systems[name] = sys_
        print(f"  loaded {name} in {load_s:.1f} s", flush=True)
    return systems, info


def load_times(gguf: Path, names: list[str], reps: int, threads: int) -> dict[str, Any]:
    """Seconds from a GGUF path to a system ready to generate, fresh each time (median of
    ``reps``): ours native (memory-mapped blocks), ours fp32 (dequantized), llama.cpp."""
    out: dict[str, Any] = {}

    def ours(dtype: Any) -> None:
        from mlsyskit.engine import LLM

        LLM(gguf, dtype=dtype)

    def llama() -> None:
        from llama_cpp import Llama

        Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, verbose=False)

    for name, fn in (("ours", lambda: ours(None)), ("ours_fp32", lambda: ours("float32")), ("llamacpp", llama)):
        if name not in names:
            continue
        times = [common.timed(fn)[1] for _ in range(reps)]
        out[name] = {"load_s_median": round(float(np.median(times)), 3), "load_s": [round(x, 3) for x in times],
                     "loadavg_1m": common.loadavg()}
    return out


def tokenizer_agreement(systems: dict[str, System], tok: Any, reqs: list[Request]) -> dict[str, Any]:
    """How many of the first 16 prompts the baselines' own tokenizers encode to exactly our
    ids (every system is given our ids; this says whether they would agree on the text)."""
    check: dict[str, Any] = {}
    sample_texts = [tok.decode(r.prompt_ids) for r in reqs[: min(16, len(reqs))]]
    mine = [tok.encode(t) for t in sample_texts]
    if "hf" in systems or "hf_batch" in systems:
        hf_tok = (systems.get("hf") or systems["hf_batch"]).tokenizer  # type: ignore[attr-defined]
        check["transformers_equal"] = sum(hf_tok(t, add_special_tokens=False)["input_ids"] == m for t, m in zip(sample_texts, mine, strict=True))
    if "llamacpp" in systems:
        lc = systems["llamacpp"].llm  # type: ignore[attr-defined]
        check["llamacpp_equal"] = sum(lc.tokenize(t.encode(), add_bos=False, special=False) == m for t, m in zip(sample_texts, mine, strict=True))
    check["compared"] = len(sample_texts)
    return check
