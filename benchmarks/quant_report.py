"""Weight quantization of SmolLM2-135M: ours against llama.cpp's own quantizers, on one ground.

The float reference is the embedded SmolLM2-135M-Instruct GGUF dequantized to fp32 and written
as an F32 GGUF (`mlsyskit export-gguf --dtype f32`). llama.cpp quantizes that file with its own
quantizer (`llama_model_quantize` through llama-cpp-python) to Q8_0, Q5_K_M, Q4_K_M, Q4_0 and
Q3_K_M; we quantize the same model with `mlsyskit quantize` (RTN, AWQ, GPTQ, AWQ+GPTQ, the
presets q8/q4/q3, float zero points with double-quantized scales). SmolLM2's rows are 576 wide,
not a multiple of 256, so llama.cpp falls back from K-quants to Q5_0/Q5_1/Q4_0/Q8_0 for most
tensors (it says so): its files are measured as they are, bits included.

Every row is scored by one scorer, our engine (`mlsyskit perplexity`, which reads llama.cpp's
K-quant files), on the same held-out windows: the last 10 % of Tiny Shakespeare, --eval-tokens
tokens, non-overlapping windows of 512. Bits per weight are counted the same way for all rows:
stored bits of the linear weights (the tied embedding counted once, as the output projection),
scales and minimums included (llama.cpp: the bytes of its blocks). Our tied embedding table is
quantized like the output projection and serves both (rows dequantized on lookup), as
llama.cpp's token_embd does, so file sizes compare directly. A check compares our
perplexity of each llama.cpp file (and the F32 one) with llama.cpp's own on 4,096 held-out
tokens (--check-tokens), with float activations and with llama.cpp's activation rounding
(`mlsyskit perplexity --activations llama.cpp`); the goal (within 0.5 %) is judged on the latter.

Stages (each caches its JSON in --cache, so a stage can be rerun alone; --rows REGEX limits
prepare, score and decode to the rows it matches, and their results merge with the cached ones):

  prepare  F32 GGUF, llama.cpp's files, our quantized directories (calibration: 16 windows of
           256 tokens of the first 90 % of Tiny Shakespeare)             [no timing]
  score    perplexity, bits per weight, file size of every row; llama.cpp's own perplexity
  decode   per row, a fresh process loads the model in the engine, decodes --decode-tokens
           tokens at batch 1 (greedy, 1 thread) and reports tok/s and its peak RSS; llama.cpp's
           files also on the engine's float path (dtype float32: the naive baseline) and in
           llama.cpp itself (llama-cpp-python, 1 thread)
           [timed: run alone on the machine, e.g. under flock -x /tmp/quiet.lock; split with
           --rows to keep each exclusive run short]
  report   benchmarks/results/quant_report.json + .png (bits/perplexity frontier), the table

    .venv/bin/python benchmarks/quant_report.py --stage prepare
    .venv/bin/python benchmarks/quant_report.py --stage score
    flock -x /tmp/quiet.lock .venv/bin/python benchmarks/quant_report.py --stage decode --rows '^(fp32|int8|int4)'
    flock -x /tmp/quiet.lock .venv/bin/python benchmarks/quant_report.py --stage decode --rows '^(int3|llama)'
    .venv/bin/python benchmarks/quant_report.py --stage report
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

MLSYSKIT = [sys.executable, "-m", "mlsyskit.cli"]
LLAMA_TYPES = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M")
CALIB = ["--calib-windows", "16", "--threads", "1"]
# our rows: name -> `mlsyskit quantize` flags (None: the F32 reference itself)
OURS: dict[str, list[str] | None] = {
    "fp32": None,
    "int8 (preset q8)": ["--preset", "q8"],
    "int4 RTN g32": ["--bits", "4", "--group-size", "32"],
    "int4 AWQ g32, int8 head": ["--bits", "4", "--group-size", "32", "--method", "awq", "--lm-head", "int8", *CALIB],
    "int4 GPTQ g32, int8 head": ["--bits", "4", "--group-size", "32", "--method", "gptq", "--lm-head", "int8", *CALIB],
    "int4 AWQ+GPTQ g32, int8 head": ["--bits", "4", "--group-size", "32", "--method", "awq-gptq", "--lm-head", "int8", *CALIB],
    "int4 AWQ+GPTQ g32 float zero, dq scales, int8 head (preset q4)": ["--preset", "q4", *CALIB],
    "int3 RTN g32": ["--bits", "3", "--group-size", "32"],
    "int3 AWQ+GPTQ g32, int8 head": ["--bits", "3", "--group-size", "32", "--method", "awq-gptq", "--lm-head", "int8", *CALIB],
    # the same mix at a tighter budget, where some layers stay at 3 bits
    "int3 base, layers to 4/8 bits by sensitivity <= 5.0 bpw, float zero, dq scales, AWQ+GPTQ, int8 table": ["--bits", "3", "--group-size", "32", "--zero-point", "float", "--double-quant", "--method", "awq-gptq", "--lm-head", "int8", "--budget", "5.0", *CALIB],
    "int3 base, layers to 4/8 bits by sensitivity <= 5.44 bpw, float zero, dq scales, AWQ+GPTQ, int8 table (preset q3)": ["--preset", "q3", *CALIB],
}
CHECK_FILES = (*(f"llama-{t}.gguf" for t in LLAMA_TYPES), "f32.gguf")
GOALS = {"int8_ppl_increase_max": 0.005, "llama_cpp_scoring_agreement_max": 0.005}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("prepare", "score", "decode", "report"), required=True)
    p.add_argument("--cache", default="/tmp/mlsyskit-quant-report", help="where files and stage results are kept (default: /tmp/mlsyskit-quant-report)")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="folder with shakespeare/input.txt (default: $MLSYSKIT_DATA_DIR or ../shared/data)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (default: 4096)")
    p.add_argument("--check-tokens", type=int, default=4096, help="tokens of the llama.cpp scoring check; with llama.cpp's per-256 activation rounding a K-quant score moves ~0.4 %% on 1,024 tokens from rounding flips alone, ~0.1-0.2 %% on 4,096 (default: 4096)")
    p.add_argument("--decode-tokens", type=int, default=48, help="new tokens per decode measurement (default: 48)")
    p.add_argument("--rows", default=None, metavar="REGEX", help="prepare/score/decode only the rows whose name matches (re.search, case-insensitive); the others keep their cached results (default: every row)")
    p.add_argument("--jobs", type=int, default=2, help="rows scored at once (default: 2)")
    p.add_argument("--out", default=str(common.RESULTS / "quant_report.json"), help="JSON output; the PNG goes beside it")
    p.add_argument("--child-decode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-how", default="native", choices=("native", "float32", "llama.cpp"), help=argparse.SUPPRESS)
    return p.parse_args()


def texts(args: argparse.Namespace, cache: Path) -> tuple[Path, Path]:
    """(calibration text, held-out text): the first 90 % and last 10 % of Tiny Shakespeare,
    or an embedded text split the same way when the data is absent."""
    src = Path(args.data_dir or "") / "shakespeare" / "input.txt"
    text = src.read_text() if src.is_file() else _embedded_text()
    split = int(len(text) * 0.9)
    calib, held = cache / "calib.txt", cache / "heldout.txt"
    calib.write_text(text[:split])
    held.write_text(text[split:])
    return calib, held


def _embedded_text() -> str:
    from mlsyskit.quant.calibration import default_calibration_text

    return default_calibration_text()


def selected(args: argparse.Namespace, name: str) -> bool:
    """Whether --rows selects the row ``name``."""
    return args.rows is None or re.search(args.rows, name, re.IGNORECASE) is not None


def rows(cache: Path, args: argparse.Namespace | None = None) -> dict[str, Path]:
    """Every row's model path (ours: directories; llama.cpp: GGUF files) prepared so far; with
    ``args``, only those --rows selects."""
    out = {name: cache / ("f32.gguf" if flags is None else slug(name)) for name, flags in OURS.items()}
    out.update({f"llama.cpp {t}": cache / f"llama-{t}.gguf" for t in LLAMA_TYPES})
    return {n: p for n, p in out.items() if p.exists() and (args is None or selected(args, n))}


def prepare(args: argparse.Namespace, cache: Path) -> None:
    from mlsyskit.quant.llama_cpp_peer import quantize

    calib, _ = texts(args, cache)
    f32 = cache / "f32.gguf"
    if not f32.exists():
        subprocess.run([*MLSYSKIT, "export-gguf", "--dtype", "f32", "--out", str(f32)], check=True)
    for t in LLAMA_TYPES:
        out = cache / f"llama-{t}.gguf"
        if not out.exists() and selected(args, f"llama.cpp {t}"):
            t0 = time.perf_counter()
            quantize(f32, out, t, threads=1)
            (cache / f"llama-{t}.seconds").write_text(f"{time.perf_counter() - t0:.1f}")
    for name, flags in OURS.items():
        out = cache / slug(name)
        if flags is None or out.exists() or not selected(args, name):
            continue
        extra = ["--calib", str(calib)] if "--calib-windows" in flags else ["--threads", "1"]
        log(f"quantize {name}")
        r = subprocess.run([*MLSYSKIT, "quantize", *flags, *extra, "--out", str(out)], capture_output=True, text=True, check=True)
        (cache / f"{slug(name)}.quantize.json").write_text(r.stdout)


def score(args: argparse.Namespace, cache: Path) -> None:
    _, held = texts(args, cache)

    def one(item: tuple[str, Path]) -> tuple[str, dict[str, Any]]:
        name, path = item
        r = subprocess.run([*MLSYSKIT, "perplexity", "--model", str(path), "--text", str(held), "--window", "512",
                            "--max-tokens", str(args.eval_tokens), "--threads", "1"], capture_output=True, text=True, check=True)
        res = json.loads(r.stdout)
        log(f"{name:55s} ppl {res['perplexity']:.4f} bpw {res['bits_per_weight']:.3f}")
        return name, res

    done = json.loads((cache / "score.json").read_text()) if (cache / "score.json").exists() else {"rows": {}}
    # rows scored before are kept unless --rows names them again
    todo = {n: p for n, p in rows(cache, args).items() if n not in done["rows"] or args.rows is not None}
    with ThreadPoolExecutor(args.jobs) as pool:
        done["rows"].update(pool.map(one, todo.items()))
    check = done.setdefault("llama_cpp_check", {})
    for f in CHECK_FILES:  # files not checked yet, or checked on another number of tokens
        if check.get(f, {}).get("max_tokens") != args.check_tokens:
            check[f] = llama_cpp_check(args, cache / f, held)
    # one entry per score run (a --rows run adds one), with the rows it scored
    done.setdefault("parts", []).append({"rows": list(todo), "load_average_1min": common.loadavg()})
    common.write_json(cache / "score.json", done)


def llama_cpp_check(args: argparse.Namespace, path: Path, held: Path) -> dict[str, Any]:
    """llama.cpp's own perplexity of the GGUF ``path`` against ours, same tokens, same windows
    (each window of 256 evaluated from position 0, all but its first token scored). llama.cpp
    rounds the activations to 8 bits in its products with quantized weights (Q8_0 per 32, Q8_K
    per 256 for K-quants), which our scorer does not (``ours``); ``ours_llama_cpp_activations``
    is our score with that rounding (``--activations llama.cpp``). The F32 file shows the
    scorers' agreement without any rounding. The goal is judged on the rounded score: it is
    llama.cpp's arithmetic, so only float-level differences that flip a rounding remain."""
    from mlsyskit.quant.llama_cpp_peer import perplexity

    window = 256

    def ours(*extra: str) -> dict[str, Any]:
        r = subprocess.run([*MLSYSKIT, "perplexity", "--model", str(path), "--text", str(held), "--window", str(window),
                            "--max-tokens", str(args.check_tokens), "--threads", "1", *extra], capture_output=True, text=True, check=True)
        return json.loads(r.stdout)

    plain = ours()
    rounded = ours("--activations", "llama.cpp") if path.name != "f32.gguf" else plain
    theirs, ids = perplexity(path, held.read_text(), window, args.check_tokens)
    diff = plain["perplexity"] / theirs - 1
    diff_rounded = rounded["perplexity"] / theirs - 1
    log(f"scoring check on {path.name}: ours {plain['perplexity']:.4f}, with llama.cpp's activation rounding "
        f"{rounded['perplexity']:.4f}, llama.cpp {theirs:.4f} ({diff:+.3%}, {diff_rounded:+.3%})")
    return {"file": path.name, "max_tokens": args.check_tokens, "tokens": len(ids) - (len(ids) + window - 1) // window,
            "window": window, "ours": plain["perplexity"],
            "ours_llama_cpp_activations": rounded["perplexity"], "llama_cpp": theirs,
            "relative_difference": diff, "relative_difference_llama_cpp_activations": diff_rounded,
            "met": abs(diff_rounded) <= GOALS["llama_cpp_scoring_agreement_max"]}


def decode(args: argparse.Namespace, cache: Path) -> None:
    """Decode speed and peak RSS of the rows --rows selects, merged into decode.json (so one
    exclusive run can be split into several), each part with its load averages."""
    path_json = cache / "decode.json"
    out: dict[str, Any] = json.loads(path_json.read_text()) if path_json.exists() else {"rows": {}, "parts": []}
    part: dict[str, Any] = {"rows": [], "load_average_1min_start": common.loadavg(), "cpu_model": common.cpu_model()}
    def child(path: Path, how: str) -> dict[str, Any]:
        r = subprocess.run([sys.executable, __file__, "--stage", "decode", "--child-decode", str(path), "--child-how", how,
                            "--decode-tokens", str(args.decode_tokens)], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    for name, path in rows(cache, args).items():
        row = out["rows"][name] = child(path, "native")
        if name.startswith("llama.cpp"):  # the same file on the naive float path, and in llama.cpp
            row["decode_tok_s_float_path"] = child(path, "float32")["decode_tok_s"]
            row["decode_tok_s_llama_cpp"] = child(path, "llama.cpp")["decode_tok_s"]
        part["rows"].append(name)
        log(f"{name:55s} {row['decode_tok_s']:.1f} tok/s (float path {row.get('decode_tok_s_float_path', '-')}, "
            f"llama.cpp {row.get('decode_tok_s_llama_cpp', '-')}), peak RSS {row['peak_rss_mib']:.0f} MiB")
        common.write_json(path_json, {**out, "parts": [*out["parts"], {**part, "load_average_1min_end": common.loadavg()}]})
    part["load_average_1min_end"] = common.loadavg()
    out["parts"].append(part)
    common.write_json(path_json, out)


def child_decode(path: str, tokens: int, how: str) -> None:
    """Decode tok/s at batch 1, one thread: ``how`` = "native" (the engine's default: quantized
    weights on the kernels), "float32" (the engine, weights dequantized on load: the naive
    path) or "llama.cpp" (llama-cpp-python on the same GGUF file)."""
    import torch

    from mlsyskit.engine import LLM, SamplingParams

    torch.set_num_threads(1)
    prompt = list(range(100, 132))
    if how == "llama.cpp":
        return child_decode_llama_cpp(path, tokens, prompt)
    llm = LLM(path, max_model_len=256, num_kv_blocks=16, block_size=16, max_num_seqs=1,
              dtype="float32" if how == "float32" else None)
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm up
    best = 0.0
    for _ in range(2):
        o = llm.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))[0]
        best = max(best, common.decode_tok_s(len(o.token_ids), o.first_token_time, o.finish_time) or 0.0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"decode_tok_s": best, "peak_rss_mib": rss}))


def child_decode_llama_cpp(path: str, tokens: int, prompt: list[int]) -> None:
    from mlsyskit.quant.llama_cpp_peer import llama_cpp

    llm = llama_cpp().Llama(model_path=path, n_ctx=256, n_threads=1, n_batch=64, verbose=False)
    best = 0.0
    for n in (4, tokens, tokens):  # a warm-up, then the best of two
        llm.reset()
        times = []
        for _ in llm.generate(prompt, temp=0.0, reset=True):  # greedy; does not stop at EOS
            times.append(time.perf_counter())
            if len(times) == n:
                break
        best = max(best, common.decode_tok_s(len(times), times[0], times[-1]) or 0.0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"decode_tok_s": best, "peak_rss_mib": rss}))


def report(args: argparse.Namespace, cache: Path) -> None:
    sc = json.loads((cache / "score.json").read_text())
    dec = json.loads((cache / "decode.json").read_text()) if (cache / "decode.json").exists() else {"rows": {}, "parts": []}
    table = []
    for name in rows(cache):
        if name not in sc["rows"]:
            continue
        s = sc["rows"][name]
        d = dec["rows"].get(name, {})
        table.append({
            "name": name, "family": "llama.cpp" if name.startswith("llama.cpp") else "ours",
            "recipe": OURS.get(name) if not name.startswith("llama.cpp") else f"llama_model_quantize {name.split()[-1]}",
            "perplexity": s["perplexity"], "bits_per_weight": s["bits_per_weight"], "file_bytes": s["file_bytes"],
            "model_bytes": s["model_bytes"], "file_type": s["file_type"],
            "decode_tok_s": d.get("decode_tok_s"), "peak_rss_mib": d.get("peak_rss_mib"),
            "decode_tok_s_float_path": d.get("decode_tok_s_float_path"), "decode_tok_s_llama_cpp": d.get("decode_tok_s_llama_cpp"),
        })
    fp32 = table[0]["perplexity"]
    for r in table:
        r["ppl_increase"] = r["perplexity"] / fp32 - 1
    by = {r["name"]: r for r in table}
    result = {
        "benchmark": "quant_report",
        "run": common.run_stamp(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs",
        "cpu_model": common.cpu_model(),
        "load_average_1min": {"score_parts": [p["load_average_1min"] for p in sc.get("parts", [])],
                              "decode_parts": [{k: p[k] for k in ("load_average_1min_start", "load_average_1min_end")} for p in dec["parts"]]},
        "reference": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded) dequantized, written as F32 GGUF",
        "heldout": {"text": "last 10 % of Tiny Shakespeare", "tokens": args.eval_tokens, "window": 512},
        "rows": table,
        "llama_cpp_check": sc["llama_cpp_check"],
        "goals": goals(by, sc["llama_cpp_check"]),
    }
    out = common.write_json(args.out, result)
    plot(table, out.with_suffix(".png"))
    print_table(result)




def _best(table: dict[str, dict[str, Any]], prefix: str, max_bits: float) -> dict[str, Any] | None:
    cands = [r for r in table.values() if r["family"] == "ours" and r["name"].startswith(prefix) and r["bits_per_weight"] <= max_bits]
    return min(cands, key=lambda r: r["perplexity"]) if cands else None


def goals(by: dict[str, dict[str, Any]], check: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ours, theirs in (("int4", "llama.cpp Q4_K_M"), ("int3", "llama.cpp Q3_K_M")):
        if theirs not in by:
            continue
        ref = by[theirs]
        best = _best(by, ours, ref["bits_per_weight"])
        out[f"best_{ours}_beats_{theirs.split()[-1]}_at_same_or_fewer_bits"] = {
            "ours": best and best["name"], "ours_perplexity": best and best["perplexity"], "ours_bpw": best and best["bits_per_weight"],
            "theirs_perplexity": ref["perplexity"], "theirs_bpw": ref["bits_per_weight"],
            "met": bool(best and best["perplexity"] < ref["perplexity"]),
        }
    if "int8 (preset q8)" in by:
        int8 = by["int8 (preset q8)"]["ppl_increase"]
        out["int8_within_0.5pct"] = {"ppl_increase": int8, "met": int8 <= GOALS["int8_ppl_increase_max"]}
    out["llama_cpp_scoring_within_0.5pct"] = {
        "relative_difference": {f: c["relative_difference"] for f, c in check.items()},
        "relative_difference_llama_cpp_activations": {f: c.get("relative_difference_llama_cpp_activations") for f, c in check.items()},
        "met": all(c["met"] for c in check.values()),
    }
    return out


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'row':55s} {'ppl':>8s} {'vs fp32':>8s} {'bpw':>6s} {'MiB file':>8s} {'MiB RSS':>8s} {'tok/s':>6s}")
    for r in result["rows"]:
        tok = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "-"
        print(f"{r['name']:55s} {r['perplexity']:8.3f} {r['ppl_increase']:+8.2%} {r['bits_per_weight']:6.3f} "
              f"{r['file_bytes'] / 2**20:8.1f} {rss:>8s} {tok:>6s}"
              + (f"  (float path {r['decode_tok_s_float_path']}, llama.cpp {r['decode_tok_s_llama_cpp']})" if r.get("decode_tok_s_llama_cpp") else ""))
    for name, g in result["goals"].items():
        print(f"goal {name}: {'met' if g['met'] else 'MISSED'} {({k: v for k, v in g.items() if k != 'met'})}")


def plot(table: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(table):
        if r["bits_per_weight"] > 16:
            continue
        ours = r["family"] == "ours"
        ax.scatter(r["bits_per_weight"], r["perplexity"], color="tab:red" if ours else "tab:blue", marker="o" if ours else "s")
        # short labels (the preset, or the name up to its first comma), staggered: many rows sit near 5.3 bits
        label = f"preset {r['name'].rsplit('preset ', 1)[1].rstrip(')')}" if "(preset" in r["name"] else r["name"].split(",")[0]
        ax.annotate(label, (r["bits_per_weight"], r["perplexity"]), textcoords="offset points",
                    xytext=(5, -9 + 7 * (i % 3)), fontsize=6)
    fp32 = table[0]["perplexity"]
    ax.axhline(fp32, color="gray", ls="--", lw=1)
    ax.text(ax.get_xlim()[0], fp32, " fp32", va="bottom", fontsize=7, color="gray")
    ax.set_yscale("log")  # int3 RTN is far above the rest
    ax.set_xlabel("bits per linear weight (scales, minimums and the tied head included)")
    ax.set_ylabel("perplexity, held-out Tiny Shakespeare (our engine scores every row)")
    ax.set_title("SmolLM2-135M: ours (red) vs llama.cpp's quantizers (blue)")
    common.save_figure(fig, path)


def main() -> None:
    args = parse_args()
    if args.child_decode:
        child_decode(args.child_decode, args.decode_tokens, args.child_how)
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "score": score, "decode": decode, "report": report}[args.stage](args, cache)


if __name__ == "__main__":
    main()
