"""Speculative decoding by prompt lookup on a RAG-like workload, against the peers' own.

Each prompt is a chat turn holding a context passage (Tiny Shakespeare, a dialogue of about
100-150 tokens) and a request to repeat or quote from it, so the answer copies from the
context: the case prompt lookup is for. The embedded SmolLM2-135M-Instruct Q4_1 GGUF, greedy,
up to ``--max-tokens`` new tokens (stopping at end of turn), 2 threads, in one process:

  ours naive   LLM() on the GGUF's native blocks, no drafting
  ours ngram   LLM(speculative="ngram", num_speculative_tokens=K, ngram_max=3)
  llama.cpp    llama-cpp-python on the same GGUF, plain and with LlamaPromptLookupDecoding
               (num_pred_tokens=K, max_ngram_size=3)
  transformers generate() on the GGUF dequantized to fp32, plain and with
               prompt_lookup_num_tokens=K (max_matching_ngram_size=3)

Batch 1: the prompts one at a time, ``--reps`` rounds, the systems taking turns in rotated
order; tok/s is generated tokens over the summed request wall time (prefill included). A
small batch (``--batch`` prompts at once) for ours, naive and ngram (llama.cpp and
transformers' prompt lookup take one sequence at a time). For each speculative system:
verify steps, tokens per step (so mean accepted draft length = tokens per step - 1), for ours
also drafted/accepted tokens and the acceptance rate, and whether its output equals its plain
twin's token for token.

    .venv/bin/python benchmarks/engine_speculative.py            # ~3 min here
    .venv/bin/python benchmarks/engine_speculative.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

QUESTIONS = [
    "Repeat the text above.",
    "Copy the text above exactly.",
    "Quote the first speaker's lines from the text above.",
    "Repeat the text above word for word.",
]


def passages(text: str, n: int, chars: int) -> list[str]:
    """``n`` dialogue passages from spread-out places of the text, each starting at a speaker."""
    out = []
    for i in range(n):
        at = text.index("\n\n", (i + 1) * len(text) // (n + 2)) + 2
        cut = text[at : at + chars]
        out.append(cut[: cut.rfind("\n") if "\n" in cut else len(cut)].strip())
    return out


def build_prompts(tok: Any, args: argparse.Namespace) -> list[list[int]]:
    from mlsyskit.engine.llm import LLM  # noqa: F401  (the engine's tokenizer renders the template)

    path = common.find_file("shakespeare/input.txt", args.data_dir, common.default_data_dir(existing_only=True))
    if path is None:
        raise SystemExit("Tiny Shakespeare not found: give --data-dir (the folder holding shakespeare/input.txt)")
    prompts = []
    for i, ctx in enumerate(passages(path.read_text(), args.prompts, args.context_chars)):
        msgs = [{"role": "user", "content": f"{ctx}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True)
        prompts.append(tok.encode(text, add_bos=False))
    return prompts


class OursSystem:
    def __init__(self, name: str, ckpt: Any, eos: set[int], spec: dict[str, Any]) -> None:
        from mlsyskit.engine import LLM

        self.name, self.ckpt, self.eos, self.spec = name, ckpt, eos, spec
        self.llm = LLM(ckpt, **spec)

    def reset(self) -> None:
        from mlsyskit.engine import LLM

        self.llm = None  # fresh engine: no prefix cache carried from the last round
        self.llm = LLM(self.ckpt, **self.spec)

    def stats(self) -> dict[str, float]:
        return self.llm.engine.spec_stats()

    def run(self, prompts: list[list[int]], n: int, together: bool = False) -> tuple[list[list[int]], float, int]:
        """The prompts one at a time (batch 1), or all at once (``together``)."""
        from mlsyskit.engine import SamplingParams

        eng = self.llm.engine
        params = SamplingParams(max_tokens=n, temperature=0)
        groups = [prompts] if together else [[p] for p in prompts]
        outs, seconds, steps = [], 0.0, 0
        for group in groups:
            steps0 = eng.num_steps
            t0 = time.perf_counter()
            outs += [list(o.token_ids) for o in self.llm.generate(group, params)]
            seconds += time.perf_counter() - t0
            steps += eng.num_steps - steps0 - 1  # the first step is the prefill
        return outs, seconds, steps


class LlamaCppSystem:
    def __init__(self, name: str, gguf: Path, threads: int, eos: set[int], k: int | None, n_ctx: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.name, self.eos = name, eos
        draft = None if k is None else LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=k)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, draft_model=draft, verbose=False)
        self.evals = 0
        inner = self.llm.eval

        def counted(tokens: Any) -> None:  # one model call per step: prefill, then decode/verify
            self.evals += 1
            inner(tokens)

        self.llm.eval = counted

    def reset(self) -> None:
        self.llm.reset()

    def run(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, int]:
        outs, seconds, steps = [], 0.0, 0
        for ids in prompts:
            self.llm.reset()
            e0 = self.evals
            toks: list[int] = []
            t0 = time.perf_counter()
            for tok in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                if int(tok) in self.eos:
                    break
                toks.append(int(tok))
                if len(toks) >= n:
                    break
            seconds += time.perf_counter() - t0
            steps += self.evals - e0 - 1  # the prompt's eval is not a decode step
            outs.append(toks)
        return outs, seconds, steps


class HFSystem:
    def __init__(self, name: str, model: Any, eos: set[int], k: int | None) -> None:
        self.name, self.model, self.eos, self.k = name, model, eos, k
        self.calls = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def reset(self) -> None:
        pass

    def run(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, int]:
        import torch

        outs, seconds, steps = [], 0.0, 0
        for ids in prompts:
            extra = {} if self.k is None else {"prompt_lookup_num_tokens": self.k, "max_matching_ngram_size": 3}
            c0 = self.calls
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          do_sample=False, max_new_tokens=n, eos_token_id=sorted(self.eos),
                                          pad_token_id=min(self.eos), **extra)
            seconds += time.perf_counter() - t0
            steps += self.calls - c0 - 1  # the first call is the prefill
            toks = out[0, len(ids):].tolist()
            while toks and toks[-1] in self.eos:
                toks.pop()
            outs.append(toks)
        return outs, seconds, steps


def summarize(name: str, runs: list[tuple[list[list[int]], float, int]]) -> dict[str, Any]:
    tokens = sum(len(t) for outs, _, _ in runs for t in outs)
    seconds = sum(s for _, s, _ in runs)
    steps = sum(st for _, _, st in runs)
    return {"system": name, "tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2),
            "decode_steps": steps, "tokens_per_step": round(tokens / steps, 3) if steps else None}


def main(argv: list[str] | None = None) -> int:
    args = common.parse_with_quick(build_parser(), argv, {"prompts": 2, "reps": 1, "max_tokens": 32, "batch": 2})
    import torch

    torch.set_num_threads(args.threads)
    from mlsyskit.engine import load_checkpoint
    from mlsyskit.models.checkpoint import default_model_path

    gguf = Path(args.model) if args.model else default_model_path()
    ckpt = load_checkpoint(str(gguf), native=True)
    tok = ckpt.tokenizer
    eos = set(tok.eos_ids)
    prompts = build_prompts(tok, args)
    k = args.k
    common.log(f"{len(prompts)} prompts of {[len(p) for p in prompts]} tokens; K={k}; load {common.loadavgs()}")

    spec = {"speculative": "ngram", "num_speculative_tokens": k, "ngram_max": 3}
    systems: dict[str, Any] = {
        "ours naive": OursSystem("ours naive", ckpt, eos, {}),
        "ours ngram": OursSystem("ours ngram", ckpt, eos, spec),
    }
    twins = {"ours ngram": "ours naive"}
    if not args.no_llama_cpp:
        n_ctx = max(len(p) for p in prompts) + args.max_tokens + 16
        systems["llama.cpp"] = LlamaCppSystem("llama.cpp", gguf, args.threads, eos, None, n_ctx)
        systems["llama.cpp prompt-lookup"] = LlamaCppSystem("llama.cpp prompt-lookup", gguf, args.threads, eos, k, n_ctx)
        twins["llama.cpp prompt-lookup"] = "llama.cpp"
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        systems["transformers"] = HFSystem("transformers", hf, eos, None)
        systems["transformers prompt-lookup"] = HFSystem("transformers prompt-lookup", hf, eos, k)
        twins["transformers prompt-lookup"] = "transformers"

    # warm-up: one short request each (first-call costs: thread pools, page faults, caches)
    for s in systems.values():
        s.run(prompts[:1], 4)
        s.reset()

    runs: dict[str, list] = {name: [] for name in systems}
    for rnd in range(args.reps):
        for name in common.rotated(list(systems), rnd):
            systems[name].reset()
            runs[name].append(systems[name].run(prompts, args.max_tokens))
            common.log(f"round {rnd} {name}: {summarize(name, runs[name][-1:])['tok_s']} tok/s")
    batch1 = [summarize(name, r) for name, r in runs.items()]
    for row in batch1:
        if row["system"] == "ours ngram":
            systems["ours ngram"].reset()
            systems["ours ngram"].run(prompts, args.max_tokens)
            row.update({f"ours_{key}": round(v, 4) for key, v in systems["ours ngram"].stats().items()})
        if row["system"] in twins:
            twin = twins[row["system"]]
            row["identical_to"] = twin
            row["identical"] = runs[row["system"]][0][0] == runs[twin][0][0]
            row["mean_accepted"] = round(row["tokens_per_step"] - 1, 3) if row["tokens_per_step"] else None
    naive = {r["system"]: r["tok_s"] for r in batch1}
    for row in batch1:
        row["speedup_vs_own_plain"] = round(row["tok_s"] / naive[twins[row["system"]]], 3) if row["system"] in twins else None
        if "llama.cpp" in naive:
            row["vs_llama_cpp"] = round(row["tok_s"] / naive["llama.cpp"], 3)

    # a small batch, ours only: all prompts (repeated to --batch) at once, continuous batching
    bprompts = (prompts * (-(-args.batch // len(prompts))))[: args.batch]
    bruns: dict[str, list] = {"ours naive": [], "ours ngram": []}
    for rnd in range(args.reps):
        for name in common.rotated(list(bruns), rnd):
            systems[name].reset()
            bruns[name].append(systems[name].run(bprompts, args.max_tokens, together=True))
    batch = [summarize(name, r) for name, r in bruns.items()]
    systems["ours ngram"].reset()
    systems["ours ngram"].run(bprompts, args.max_tokens, together=True)
    batch[1].update({f"ours_{key}": round(v, 4) for key, v in systems["ours ngram"].stats().items()})
    batch[1]["identical"] = bruns["ours ngram"][0][0] == bruns["ours naive"][0][0]
    batch[1]["speedup_vs_own_plain"] = round(batch[1]["tok_s"] / batch[0]["tok_s"], 3)
    if "llama.cpp" in naive:
        for row in batch:
            row["vs_llama_cpp_one_by_one"] = round(row["tok_s"] / naive["llama.cpp"], 3)

    report = {
        **common.run_stamp(),
        "cpu": common.cpu_model(),
        "loadavg_end": common.loadavgs(),
        "threads": args.threads,
        "model": gguf.name,
        "workload": {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "max_tokens": args.max_tokens,
                     "reps": args.reps, "k": k, "ngram_max": 3, "batch": args.batch,
                     "stops_at": "end of turn or max_tokens", "greedy": True},
        "versions": common.package_versions(("torch", "transformers", "llama_cpp_python")),
        "batch1": batch1,
        "small_batch": batch,
        "sample_output": {"prompt": tok.decode(prompts[0])[-200:], "ours ngram": tok.decode(runs["ours ngram"][0][0][0])},
    }
    out = common.write_json(Path(args.out), report)
    plot(report, Path(args.out).with_suffix(".png"))
    common.log(f"wrote {out}")
    for row in batch1 + batch:
        print(row)
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = report["batch1"] + [{**r, "system": r["system"] + f" (batch {report['workload']['batch']})"} for r in report["small_batch"]]
    names = [r["system"] for r in rows]
    ax.barh(names, [r["tok_s"] for r in rows], color=["tab:orange" if "ngram" in n or "lookup" in n else "tab:blue" for n in names])
    for i, r in enumerate(rows):
        ax.text(r["tok_s"], i, f" {r['tok_s']:.0f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens/s (end to end)")
    ax.set_title(f"Prompt-lookup speculative decoding, RAG copy workload, K={report['workload']['k']}\n{report['cpu']}", fontsize=9)
    common.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="folder holding shakespeare/input.txt")
    p.add_argument("--prompts", type=int, default=4, help="prompts (context passage + a copy question) (default: 4)")
    p.add_argument("--context-chars", type=int, default=500, help="characters of context per prompt (default: 500)")
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens per request (default: 128)")
    p.add_argument("--k", type=int, default=4, help="draft tokens per step, every speculative system (default: 4)")
    p.add_argument("--batch", type=int, default=4, help="requests at once in the small-batch part (default: 4)")
    p.add_argument("--reps", type=int, default=2, help="rounds over the prompts (default: 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    p.add_argument("--no-hf", action="store_true", help="leave transformers out")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 prompts, 32 tokens, one round")
    p.add_argument("--out", default=str(common.RESULTS / "engine_speculative.json"))
    return p


if __name__ == "__main__":
    raise SystemExit(main())
