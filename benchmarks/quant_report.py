"""Weight-only quantization of SmolLM2-135M: perplexity, bits per weight, bytes and decode speed.

One run, one process. The reference is the embedded SmolLM2-135M-Instruct GGUF dequantized to
fp32 (what the engine runs by default). Rows:

  fp32          the reference
  bf16          weights rounded to bfloat16; perplexity computed in fp32 (weight only, like the
                integer rows); decode runs the engine with dtype=bfloat16 (weights, activations
                and KV cache in bf16)
  int8          per output channel, symmetric, round to nearest (RTN)
  int4 RTN/AWQ  groups of 128 inputs, asymmetric (zero point per group); 128 does not divide
                SmolLM2's 576-wide inputs, so those layers use groups of 96, the largest
                multiple of 32 that divides 576 (WeightOnlyConfig.scheme_for); the bits per
                weight reported are the effective ones
  int3 RTN/AWQ  the same at 3 bits
  ..., int8 head  extra rows: the int4/int3 rows with the output projection at int8 per
                channel instead (what `mlsyskit quantize --lm-head int8` writes; llama.cpp
                also keeps its output tensor at higher precision). SmolLM2 ties it to the
                embedding (49152 x 576, a fifth of the linear weights), which neither RTN nor
                AWQ changes, so these are derived from the rows' own directories.

Every quantized row goes through the product path: `quantize_checkpoint` writes a quantized
directory (the lm_head, i.e. the tied embedding used as output projection, is quantized too;
AWQ quantizes it by RTN), `load_checkpoint(DIR)` reads it back, and the model is evaluated.

Perplexity: Tiny Shakespeare, held out = the last --heldout fraction of the characters,
tokenized and cut to --eval-tokens tokens, non-overlapping windows of --window tokens
(mlsyskit.quant.perplexity). AWQ calibrates on --calib: "shakespeare" = random windows of the
*other* part of Tiny Shakespeare (no overlap with the held-out text) or "pydoc" = Python's
documentation topics (the product's default calibration text).

Bits per weight: stored bits of the linear weights (codes + fp16 scales + zero points) over
all linear weights, the output projection included. llama.cpp's Q8_0 (8.5) and Q4_0 (4.5)
block formats are the reference rows (bytes per 32-weight block from gguf-py).

Decode: the engine (LLM) at batch 1, greedy, EOS ignored, --decode-tokens new tokens after a
32-token prompt, --threads threads; decode tok/s = (tokens - 1) / (last - first token time).
The rows take turns (--decode-reps rounds, order rotated each round); best of the rounds,
ratios to fp32 from the bests.

CNN: McMahan's CNN from the federated-learning subpackage (a `mlsyskit fedavg` run directory
given with --cnn-run, else trained here for --cnn-rounds FedAvg rounds on mnist-5k), test
accuracy on the real 10,000-image MNIST test set in fp32, INT8 and INT4
(mlsyskit.fl.quantized).

    .venv/bin/python benchmarks/quant_report.py            # JSON + PNG in benchmarks/results/
    .venv/bin/python benchmarks/quant_report.py --quick    # a smoke run (small sizes)
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402
from mlsyskit.engine import LLM, SamplingParams, load_checkpoint  # noqa: E402
from mlsyskit.models.transformer import build_transformer  # noqa: E402
from mlsyskit.quant.linear import (  # noqa: E402
    QuantLinear,
    int8_weight_only,
    model_bytes,
    parse_quantization,
    quantize_,
)
from mlsyskit.quant.model_io import quantize_checkpoint, quantized_tensor_of  # noqa: E402
from mlsyskit.quant.perplexity import bits_per_weight, linear_weight_bits, perplexity  # noqa: E402

GOALS = {
    "int8_ppl_increase_max": 0.005,
    "int4_awq_ppl_increase_max": 0.05,
    "int3_awq_gap_closed_min": 0.40,
    "int8_decode_speedup_min": 1.8,
    "int4_decode_speedup_min": 2.5,
}
# name -> (quantization spec or dtype, method)
ROWS = {
    "fp32": (None, None),
    "bf16": ("bfloat16", None),
    "int8": ("int8", "rtn"),
    "int4-g128 RTN": ("int4", "rtn"),
    "int4-g128 AWQ": ("int4", "awq"),
    "int3-g128 RTN": ("int3-g128", "rtn"),
    "int3-g128 AWQ": ("int3-g128", "awq"),
}
# extra rows: the row above with an int8 output projection (what `--lm-head int8` writes)
INT8_HEAD = {f"{n}, int8 head": n for n in ROWS if n.startswith("int4") or n.startswith("int3")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint to quantize (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="folder with shakespeare/input.txt and mnist/ (default: $MLSYSKIT_DATA_DIR or ../shared/data)")
    p.add_argument("--heldout", type=float, default=0.1, help="held-out fraction at the end of Tiny Shakespeare (default: 0.1)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored (default: 16384)")
    p.add_argument("--window", type=int, default=512, help="perplexity window, non-overlapping (default: 512)")
    p.add_argument("--calib", choices=("shakespeare", "pydoc"), default="shakespeare", help="AWQ calibration text (default: shakespeare, the part before the held-out slice)")
    p.add_argument("--calib-windows", type=int, default=32, help="AWQ calibration windows (default: 32)")
    p.add_argument("--calib-window-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode measurement (default: 64)")
    p.add_argument("--decode-reps", type=int, default=3, help="decode rounds; best of them (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--cnn-run", default=None, help="a `mlsyskit fedavg` CNN run directory (default: train one here)")
    p.add_argument("--cnn-rounds", type=int, default=10, help="FedAvg rounds when training the CNN here (default: 10)")
    p.add_argument("--out", default=str(common.RESULTS / "quant_report.json"), help="JSON output; the PNG goes beside it (default: benchmarks/results/quant_report.json)")
    p.add_argument("--no-head-rows", action="store_true", help="skip the extra rows with an int8 output projection (default: off)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of the rows (default: all: {', '.join(ROWS)}); goals need all")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 eval tokens, 4 calibration windows, 16 decode tokens, 1 round, 2 CNN rounds")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.eval_tokens, args.calib_windows, args.decode_tokens, args.decode_reps, args.cnn_rounds = 1024, 4, 16, 1, 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = common.loadavg()  # the machine is shared: record how busy it was
    data_dir = Path(args.data_dir)
    text = (data_dir / "shakespeare" / "input.txt").read_text()
    split = int(len(text) * (1 - args.heldout))
    ckpt = load_checkpoint(args.model)
    ids = torch.tensor(ckpt.tokenizer.encode(text[split:], add_bos=False)[: args.eval_tokens])
    calib_text = text[:split] if args.calib == "shakespeare" else None
    heldout = {
        "text": f"Tiny Shakespeare characters {split:,}..{len(text):,} (the last {args.heldout:.0%})",
        "tokens": int(ids.numel()), "window": args.window, "stride": args.window,
    }
    log(f"held-out: {heldout['tokens']} tokens; calibration: {args.calib}")

    rows: list[dict[str, Any]] = []
    engines: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wanted = [r.strip() for r in args.rows.split(",")]
        if "fp32" not in wanted or any(r not in ROWS for r in wanted):
            raise SystemExit(f"--rows must include fp32 and name rows of: {', '.join(ROWS)}")
        for name, (spec, method) in ((n, ROWS[n]) for n in wanted):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"name": name, "method": method}
            if method is None:
                dtype = torch.bfloat16 if spec == "bfloat16" else torch.float32
                model = build_transformer(ckpt.config, ckpt.state_dict, dtype)
                row.update(bits_per_weight=bits_per_weight(model), model_bytes=model_bytes(model), file_bytes=None)
                if dtype != torch.float32:  # weight only: bf16 weights, fp32 compute
                    model = build_transformer(ckpt.config, {k: v.to(dtype).float() for k, v in ckpt.state_dict.items()})
                engines[name] = (lambda d=spec: LLM(ckpt, dtype=d or "float32", **ENGINE_ARGS))
            else:
                config = int8_weight_only() if spec == "int8" else parse_quantization(spec)
                out = Path(tmp) / name.replace(" ", "-")
                summary = quantize_checkpoint(
                    args.model, out, config, method=method, calib_text=calib_text,
                    calib_name=args.calib, calib_windows=args.calib_windows,
                    calib_window_len=args.calib_window_len,
                )
                qckpt = load_checkpoint(out)
                model = build_transformer(qckpt.config, qckpt.state_dict, quantized_linear=QuantLinear)
                row.update(
                    label=summary["label"], bits_per_weight=summary["bits_per_weight"],
                    effective_group_size=summary["effective_group_size"],
                    model_bytes=model_bytes(model), file_bytes=summary["file_bytes"],
                    quantize_seconds=summary["seconds"],
                )
                engines[name] = (lambda c=qckpt: LLM(c, **ENGINE_ARGS))
                saved[name] = qckpt
            evaluate(row, model, ids, args, t0)
            rows.append(row)
            del model
        for name, base in INT8_HEAD.items():
            if base not in saved or args.no_head_rows:
                continue
            t0 = time.perf_counter()
            hckpt = with_int8_head(saved[base])
            model = build_transformer(hckpt.config, hckpt.state_dict, quantized_linear=QuantLinear)
            row = {"name": name, "method": ROWS[base][1], "label": saved[base].file_type + "-head-int8",
                   "derived_from": base, "bits_per_weight": bits_per_weight(model), "model_bytes": model_bytes(model),
                   "file_bytes": None}
            evaluate(row, model, ids, args, t0)
            rows.append(row)
            engines[name] = (lambda c=hckpt: LLM(c, **ENGINE_ARGS))
            del model
        decode = measure_decode(engines, ckpt, ids, args)
    fp32 = rows[0]
    for r in rows:
        r["ppl_increase"] = r["perplexity"] / fp32["perplexity"] - 1
        r["decode_tok_s"] = decode["best"][r["name"]]
        r["decode_speedup"] = r["decode_tok_s"] / decode["best"]["fp32"]
        r["decode_rounds_tok_s"] = decode["rounds"][r["name"]]
    n_linear, _ = linear_weight_bits(build_transformer(ckpt.config, ckpt.state_dict))
    reference = llama_cpp_reference(n_linear)
    log("CNN accuracy")
    cnn = cnn_rows(args, data_dir)
    result = {
        "benchmark": "quant_report",
        "model": ckpt.source,
        "model_file_type": ckpt.file_type,
        "reference": "the GGUF dequantized to fp32",
        "linear_weights": n_linear,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "load_average_1min": {"start": load_start, "decode": decode["load_average_1min"], "end": common.loadavg()},
        "heldout": heldout,
        "calibration": {"text": args.calib, "windows": args.calib_windows, "window": args.calib_window_len,
                        "source": "Tiny Shakespeare before the held-out slice" if args.calib == "shakespeare" else "pydoc_data.topics"},
        "decode": {"batch": 1, "new_tokens": args.decode_tokens, "prompt_tokens": 32, "rounds": args.decode_reps, "greedy": True},
        "rows": rows,
        "llama_cpp_reference": reference,
        "cnn": cnn,
        "goals": goals(rows),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = common.write_json(args.out, result)
    plot(rows, reference, out.with_suffix(".png"))
    print_table(result)
    log(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']} s")


def evaluate(row: dict[str, Any], model: Any, ids: torch.Tensor, args: argparse.Namespace, t0: float) -> None:
    res = perplexity(model, ids, window=args.window)
    row.update(perplexity=res.perplexity, nll=res.nll, scored_tokens=res.tokens)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{row['name']:26s} ppl {row['perplexity']:.4f}  bpw {row['bits_per_weight']:.3f}  "
        f"{row['model_bytes'] / 2**20:.1f} MiB in memory  ({row['seconds']} s)")


def with_int8_head(qckpt: Any) -> Any:
    """The quantized checkpoint with its output projection re-quantized to int8 per channel
    from the float embedding (tied): the same model `quantize --lm-head int8` writes, since
    neither RTN nor AWQ changes the embedding."""
    import dataclasses

    from mlsyskit.quant.model_io import split_head

    if not qckpt.config.tie_embeddings:
        raise SystemExit("the int8-head rows assume tied embeddings (SmolLM2)")
    _, head = split_head(parse_quantization("int4"), "int8")
    model = build_transformer(qckpt.config, {k: v for k, v in qckpt.state_dict.items() if k != "lm_head.weight"}, quantized_linear=QuantLinear)
    quantize_(model, head)
    state = dict(qckpt.state_dict)
    state["lm_head.weight"] = quantized_tensor_of(model.lm_head)
    return dataclasses.replace(qckpt, state_dict=state, file_type=qckpt.file_type + "-head-int8")


ENGINE_ARGS = {"max_model_len": 256, "num_kv_blocks": 16, "block_size": 16, "max_num_seqs": 1}


def measure_decode(engines: dict[str, Any], ckpt: Any, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 greedy decode tok/s of every row, rows taking turns, best of the rounds."""
    prompt = ids[:32].tolist()
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    llms = {}
    for name, make in engines.items():
        llms[name] = make()
        llms[name].generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm up
    names = list(llms)
    load = common.loadavg()
    log(f"decode: {len(names)} engines, 1-min load average {load}")
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.decode_reps):
        for name in common.rotated(names, r):
            out = llms[name].generate(prompt, params)[0]
            rounds[name].append(common.decode_tok_s(len(out.token_ids), out.first_token_time, out.finish_time))
        log("decode round " + ", ".join(f"{n} {rounds[n][-1]:.1f}" for n in names))
    return {"rounds": rounds, "best": {n: max(v) for n, v in rounds.items()}, "load_average_1min": load}


def llama_cpp_reference(n_linear: int) -> list[dict[str, Any]]:
    """llama.cpp's Q8_0 and Q4_0: bits per weight from their block sizes, and the bytes of
    SmolLM2's linear weights stored that way."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    out = []
    for name in ("Q8_0", "Q4_0"):
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        bpw = nbytes * 8 / block
        out.append({"name": f"llama.cpp {name}", "bits_per_weight": bpw, "linear_weight_bytes": int(n_linear * bpw / 8)})
    return out


def cnn_rows(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    from mlsyskit.fl.quantized import cnn_quantization_accuracy

    if args.cnn_run:
        return cnn_quantization_accuracy(args.cnn_run, data_dir)
    from mlsyskit.fl import FLConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir), model="cnn", rounds=args.cnn_rounds,
                       local_epochs=1, batch_size=10, seed=0, out=f"{tmp}/cnn", checkpoint_every=10**6,
                       threads=args.threads)
        summary = run(cfg, progress=False)
        res = cnn_quantization_accuracy(cfg.out, data_dir)
    res["run_dir"] = None
    res["trained"] = f"FedAvg here: mnist-5k, 100 IID clients, C=0.1, E=1, B=10, {summary['rounds_run']} rounds"
    return res


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    r = {row["name"]: row for row in rows}
    if not set(ROWS) <= set(r):
        return {"skipped": {"met": None, "why": "a subset of the rows was run (--rows)"}}
    fp32 = r["fp32"]["perplexity"]
    int8_inc = r["int8"]["ppl_increase"]
    awq4, rtn4 = r["int4-g128 AWQ"], r["int4-g128 RTN"]
    gap_rtn3 = r["int3-g128 RTN"]["perplexity"] - fp32
    closed = (r["int3-g128 RTN"]["perplexity"] - r["int3-g128 AWQ"]["perplexity"]) / gap_rtn3 if gap_rtn3 > 0 else None
    return {
        "int8_within_0.5pct": {"ppl_increase": int8_inc, "met": int8_inc <= GOALS["int8_ppl_increase_max"]},
        "int4_awq_within_5pct_and_better_than_rtn": {
            "ppl_increase_awq": awq4["ppl_increase"], "ppl_increase_rtn": rtn4["ppl_increase"],
            "met": awq4["ppl_increase"] <= GOALS["int4_awq_ppl_increase_max"] and awq4["perplexity"] < rtn4["perplexity"],
        },
        "int3_awq_closes_40pct_of_rtn_gap": {"gap_closed": closed, "met": closed is not None and closed >= GOALS["int3_awq_gap_closed_min"]},
        "int8_decode_1.8x": {"speedup": r["int8"]["decode_speedup"], "met": r["int8"]["decode_speedup"] >= GOALS["int8_decode_speedup_min"]},
        "int4_decode_2.5x": {
            "speedup_rtn": rtn4["decode_speedup"], "speedup_awq": awq4["decode_speedup"],
            "met": min(rtn4["decode_speedup"], awq4["decode_speedup"]) >= GOALS["int4_decode_speedup_min"],
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'row':28s} {'perplexity':>10s} {'vs fp32':>8s} {'bpw':>6s} {'MiB mem':>8s} {'MiB file':>8s} {'tok/s':>6s} {'x fp32':>6s}")
    for r in result["rows"]:
        file_mib = f"{r['file_bytes'] / 2**20:.1f}" if r["file_bytes"] else "-"
        print(f"{r['name']:28s} {r['perplexity']:10.4f} {r['ppl_increase']:+8.2%} {r['bits_per_weight']:6.3f} "
              f"{r['model_bytes'] / 2**20:8.1f} {file_mib:>8s} {r['decode_tok_s']:6.1f} {r['decode_speedup']:6.2f}")
    for ref in result["llama_cpp_reference"]:
        print(f"{ref['name']:28s} {'':>10s} {'':>8s} {ref['bits_per_weight']:6.3f}")
    for r in result["cnn"]["rows"]:
        print(f"CNN {r['name']:12s} accuracy {r['accuracy']:.4f}  bpw {r['bits_per_weight']:.3f}")
    for name, g in result["goals"].items():
        print(f"goal {name}: {'met' if g['met'] else 'MISSED' if g['met'] is False else 'skipped'} {({k: v for k, v in g.items() if k != 'met'})}")


def plot(rows: list[dict[str, Any]], reference: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        color = "tab:red" if r["method"] == "awq" else "tab:blue" if r["method"] == "rtn" else "black"
        ax.scatter(r["bits_per_weight"], r["perplexity"], color=color, marker="^" if "derived_from" in r else "o")
        ax.annotate(r["name"], (r["bits_per_weight"], r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ref in reference:
        ax.axvline(ref["bits_per_weight"], color="gray", ls="--", lw=1)
        ax.text(ref["bits_per_weight"], ax.get_ylim()[0], f" {ref['name']} ({ref['bits_per_weight']} bpw)", rotation=90, va="bottom", ha="right", fontsize=7, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xticks([3, 4, 6, 8, 16, 32], labels=["3", "4", "6", "8", "16", "32"])
    ax.set_xlabel("bits per linear weight (incl. scales and zero points)")
    ax.set_ylabel("perplexity (held-out Tiny Shakespeare)")
    ax.set_title("SmolLM2-135M: perplexity vs bits per weight")
    names = [r["name"] for r in rows]
    bx.barh(names, [r["decode_tok_s"] for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        bx.text(r["decode_tok_s"], i, f" {r['decode_speedup']:.2f}x", va="center", fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("decode tokens/s, batch 1 (best of rounds)")
    bx.set_title("engine decode speed")
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
