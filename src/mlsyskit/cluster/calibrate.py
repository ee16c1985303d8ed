"""`mlsyskit cluster calibrate`: the cost model against mlsyskit's own engine on this machine.

1. **Measure** step times of :class:`mlsyskit.engine.LLMEngine` (the embedded SmolLM2-135M, fp32,
   as ``benchmarks/engine_throughput.py`` runs it): decode steps of B sequences at context C for
   a grid of (B, C), and prefill steps of P-token prompts (one chunk, and two chunks for a
   prompt longer than the token budget). Each step is what the engine does for it: scheduling,
   the model, sampling, detokenizing.
2. **Fit** the cost model to them: the effective FLOP/s and bytes/s of the roofline (``mfu`` and
   ``mbu`` fixed at 1, so the fitted "peaks" are the achieved rates) on a log grid, and for each
   pair the step, per-sequence, per-token and per-cached-token-read overheads by least squares
   (non-negative), all on relative error, over the median time of each measured configuration. The fit is written as a spec (TOML) a user can simulate with.
3. **Replay**: a Poisson workload shaped like ``benchmarks/engine_throughput.py``'s (prompts
   uniform in 16..256 tokens, outputs in 16..96, greedy with EOS ignored) is served by a fresh
   engine for real (requests added at their arrival times, TTFT and end-to-end from the
   arrival) and by the simulator on the fitted spec; throughput and latency percentiles are
   compared (goal: within 10 % on throughput and 15 % on p50 latency).
4. The committed ``benchmarks/results/engine_throughput.json`` Poisson run (64 requests, its exact
   arrivals and lengths) is replayed in the simulator too and compared with what it measured
   (another day and machine load: a second, independent check).

The machine is shared: the load average is recorded next to every phase.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlsyskit.cluster.cost import CostParams, InstanceCost
from mlsyskit.cluster.metrics import per_request
from mlsyskit.cluster.model import ModelSpec
from mlsyskit.cluster.policies import make_policy
from mlsyskit.cluster.sim import SimResult, simulate
from mlsyskit.cluster.spec import load_spec
from mlsyskit.cluster.workload import Workload
from mlsyskit.errors import UserError
from mlsyskit.runtime import write_json

BUDGET = 512  # the engine's default max_num_batched_tokens (and engine_throughput's)
MAX_SEQS = 64
BLOCK = 16
BENCH = Path("benchmarks/results/engine_throughput.json")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------
# 1. Measure
# ------------------------------------------------------------------------------------------


def measure_steps(llm: Any, grid: dict[str, list[int]], rng: np.random.Generator, say: Any) -> list[dict[str, Any]]:
    """Time engine steps: rows of the step's shape (tokens, sampled, pairs, kv_read, seqs) and seconds."""
    from mlsyskit.engine import SamplingParams

    eng = llm.engine
    vocab = eng.config.vocab_size
    rows: list[dict[str, Any]] = []

    def prompt(n: int) -> list[int]:
        return rng.integers(200, vocab - 200, size=n).tolist()  # random ids: no prefix-cache hits

    def timed_step() -> float:
        t = time.perf_counter()
        eng.step()
        return time.perf_counter() - t

    for p in grid["prefill"]:
        for rep in range(grid["reps"]):
            rid = eng.add_request(prompt(p), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            done = 0
            while eng.has_unfinished():
                n = min(BUDGET, p - done)
                dt = timed_step()
                rows.append({"kind": "prefill", "tokens": n, "sampled": int(done + n == p), "pairs": InstanceCost.prefill_pairs(done, n),
                             "kv_read": done, "seqs": 1, "s": dt, "prompt": p, "rep": rep})
                done += n
            eng.abort(rid)
        say(f"prefill {p:4d} tokens: {rows[-1]['s'] * 1000:.0f} ms (last chunk), load {_load()}")
    steps = grid["decode_steps"]
    for c in grid["contexts"]:
        for b in grid["batches"]:
            if b * c > grid["max_tokens_in_flight"]:
                continue
            # outputs long enough that no sequence ends while the others are still prefilling
            mt = steps + (b * c) // BUDGET + 8
            ids = [eng.add_request(prompt(c), SamplingParams(max_tokens=mt, temperature=0, ignore_eos=True)) for _ in range(b)]
            while any(not eng.requests[i].out.token_ids for i in ids):
                eng.step()  # prefill them all
            times = []
            for _ in range(steps):
                cached = [eng.requests[i].seq.num_computed for i in ids]  # each sequence's KV before the step
                dt = timed_step()
                times.append(dt)
                rows.append({"kind": "decode", "tokens": b, "sampled": b, "pairs": sum(cached) + b, "kv_read": sum(cached),
                             "seqs": b, "s": dt, "batch": b, "context": c})
            for i in ids:
                eng.abort(i)
            say(f"decode batch {b:2d} at context {c:4d}: {1000 * float(np.median(times)):.0f} ms/step, load {_load()}")
    return rows


# ------------------------------------------------------------------------------------------
# 2. Fit
# ------------------------------------------------------------------------------------------


def _nnls_rel(features: np.ndarray, residual: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least squares of ``residual`` on ``features``, on relative error (weights 1/y);
    a small active-set loop (3 unknowns). Returns (coefficients, sum of squared relative errors)."""
    w = 1.0 / y
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        a = features[:, active] * w[:, None]
        sol, *_ = np.linalg.lstsq(a, residual * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    err = (features @ coef - residual) * w
    return coef, float(err @ err)


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured configuration: the median time and the mean shape of its steps
    (a load spike on the shared machine moves a median less than a mean)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["kind"], r["tokens"], r["seqs"], r.get("prompt"), r.get("context"), r["kv_read"] if r["kind"] == "prefill" else None)
        groups.setdefault(key, []).append(r)
    out = []
    for g in groups.values():
        m = {k: float(np.mean([r[k] for r in g])) for k in ("tokens", "sampled", "pairs", "kv_read", "seqs")}
        out.append({**g[0], **m, "s": float(np.median([r["s"] for r in g])), "n": len(g)})
    return out


def fit_cost(rows: list[dict[str, Any]], model: ModelSpec) -> dict[str, Any]:
    """Effective FLOP/s and bytes/s (log grid) and non-negative overheads (least squares)."""
    tok = np.array([r["tokens"] for r in rows], float)
    smp = np.array([r["sampled"] for r in rows], float)
    prs = np.array([r["pairs"] for r in rows], float)
    kvr = np.array([r["kv_read"] for r in rows], float)
    seqs = np.array([r["seqs"] for r in rows], float)
    y = np.array([r["s"] for r in rows], float)
    flops = tok * model.linear_flops_per_token + smp * model.head_flops_per_token + prs * model.attn_flops_per_pair
    nbytes = model.weight_bytes + (kvr + tok) * model.kv_bytes_per_token
    feats = np.stack([np.ones_like(y), seqs, tok, kvr], axis=1)
    best: tuple[float, float, float, np.ndarray] | None = None
    for f in np.logspace(9, 13.5, 91):
        comp = flops / f
        for bw in np.logspace(8, 12.5, 91):
            roof = np.maximum(comp, nbytes / bw)
            if (roof > y * 1.02).sum() > len(y) // 2:
                continue  # a roofline slower than most measurements cannot be right
            coef, err = _nnls_rel(feats, y - roof, y)
            if best is None or err < best[0]:
                best = (err, f, bw, coef)
    if best is None:
        raise UserError("could not fit the cost model to the measured step times")
    err, f, bw, coef = best
    params = CostParams(mfu=1.0, mbu=1.0, step_overhead_s=float(coef[0]), seq_overhead_s=float(coef[1]),
                        token_overhead_s=float(coef[2]), kv_overhead_s=float(coef[3]))
    cost = InstanceCost(model, f, bw, 1, params)
    pred = np.array([cost.step_time(r["tokens"], r["sampled"], r["pairs"], r["kv_read"], r["seqs"]) for r in rows])
    rel = np.abs(pred - y) / y
    return {
        "flops": f, "bandwidth": bw, "params": params, "cost": cost,
        "step_fit": {"mean_abs_rel_error": round(float(rel.mean()), 4), "max_abs_rel_error": round(float(rel.max()), 4),
                     "median_abs_rel_error": round(float(np.median(rel)), 4), "rows": len(rows)},
        "predicted": pred.tolist(),
    }


def fitted_spec_toml(model: ModelSpec, gguf: Path, fit: dict[str, Any], num_blocks: int) -> str:
    """The fitted machine as a spec: one "GPU" (this CPU) running one engine instance."""
    kv_bytes = num_blocks * BLOCK * model.kv_bytes_per_token
    mem_gib = (model.weight_bytes + kv_bytes) / 2**30 * 1.001 + 1e-3
    p = fit["params"]
    return f'''# Fitted by `mlsyskit cluster calibrate` on {time.strftime("%Y-%m-%d %H:%M")}: this machine's CPU running
# mlsyskit's engine on {model.name} in fp32. The "peaks" are the achieved rates (mfu = mbu = 1).
name = "this-machine"

[model]
gguf = "{gguf}"
dtype = "fp32"
kv_dtype = "fp32"
weight_gib = {model.weight_bytes / 2**30:.6f}   # the dequantized fp32 weights the engine runs

[gpu.cpu]
memory_gib = {mem_gib:.6f}
tflops = {fit["flops"] / 1e12:.6g}
bandwidth_gb_s = {fit["bandwidth"] / 1e9:.6g}

[[node]]
name = "host"
gpus = ["cpu"]

[network]
bandwidth_gb_s = 10
latency_us = 0
entry = "host"

[engine]
block_size = {BLOCK}
max_num_seqs = {MAX_SEQS}
max_num_batched_tokens = {BUDGET}
gpu_memory_utilization = 1.0
reserve_gib = 0
num_kv_blocks = {num_blocks}
admission = "chunk"

[cost]
mfu = 1.0
mbu = 1.0
step_overhead_ms = {p.step_overhead_s * 1e3:.6g}
seq_overhead_ms = {p.seq_overhead_s * 1e3:.6g}
token_overhead_us = {p.token_overhead_s * 1e6:.6g}
kv_overhead_ns = {p.kv_overhead_s * 1e9:.6g}

[workload]
arrival = "poisson"
rate = 0.5
requests = 64
prompt = {{ dist = "uniform", min = 16, max = 256 }}
output = {{ dist = "uniform", min = 16, max = 96 }}

[slo]
ttft_s = 2.0
tpot_s = 0.5
'''


# ------------------------------------------------------------------------------------------
# 3. Replay
# ------------------------------------------------------------------------------------------


def serve_real(llm_factory: Any, prompts: list[list[int]], outputs: list[int], arrivals: list[float]) -> dict[str, Any]:
    """Serve the requests with a fresh engine, each added at its arrival time (open loop)."""
    from mlsyskit.engine import SamplingParams

    llm = llm_factory()
    eng = llm.engine
    n = len(prompts)
    rid_to_i: dict[str, int] = {}
    first: dict[int, float] = {}
    fin: dict[int, float] = {}
    k = 0
    load0 = _load()
    t0 = time.perf_counter()
    while k < n or eng.has_unfinished():
        now = time.perf_counter() - t0
        while k < n and arrivals[k] <= now:
            rid = eng.add_request(prompts[k], SamplingParams(max_tokens=outputs[k], temperature=0, ignore_eos=True))
            rid_to_i[rid] = k
            k += 1
        if eng.has_unfinished():
            for out in eng.step():
                i = rid_to_i[out.request_id]
                t = time.perf_counter() - t0
                first.setdefault(i, t)
                if out.finished:
                    fin[i] = t
        elif k < n:
            time.sleep(max(0.0, arrivals[k] - (time.perf_counter() - t0)))
    return {
        "ttft": [first[i] - arrivals[i] for i in range(n)],
        "e2e": [fin[i] - arrivals[i] for i in range(n)],
        "span": max(fin.values()) - arrivals[0],
        "tokens": int(sum(outputs)),
        "steps": eng.num_steps,
        "preemptions": eng.scheduler.num_preemptions,
        "loadavg_1m": [load0, _load()],
    }


def _stats(ttft: list[float] | np.ndarray, e2e: list[float] | np.ndarray, tokens: int, span: float) -> dict[str, float]:
    t, e = np.asarray(ttft, float), np.asarray(e2e, float)
    return {
        "throughput_tok_s": round(tokens / span, 3),
        "ttft_p50": round(float(np.percentile(t, 50)), 4), "ttft_p99": round(float(np.percentile(t, 99)), 4),
        "e2e_p50": round(float(np.percentile(e, 50)), 4), "e2e_p99": round(float(np.percentile(e, 99)), 4),
    }


def _sim_stats(res: SimResult) -> dict[str, float]:
    lat = per_request(res)
    span = max(res.t_finish) - min(res.arrival)
    return _stats(lat["ttft"], lat["e2e"], int(sum(res.generated)), span)


def _errors(pred: dict[str, float], real: dict[str, float]) -> dict[str, float]:
    return {k: round((pred[k] - real[k]) / real[k], 4) for k in real if real[k]}


def compare(pred: dict[str, float], real: dict[str, float]) -> dict[str, Any]:
    err = _errors(pred, real)
    return {
        "measured": real, "simulated": pred, "relative_error": err,
        "goal_throughput_within_10pct": abs(err["throughput_tok_s"]) <= 0.10,
        "goal_p50_latency_within_15pct": abs(err["ttft_p50"]) <= 0.15 and abs(err["e2e_p50"]) <= 0.15,
    }


def scaled_spec(spec: Any, k: float) -> Any:
    """The spec with every step time multiplied by ``k`` (rates divided, overheads multiplied)."""
    import copy

    out = copy.copy(spec)
    out.instances = []
    for inst in spec.instances:
        i = copy.copy(inst)
        i.cost = inst.cost.scaled(k)
        out.instances.append(i)
    return out


def _plot(rows: list[dict[str, Any]], pred: list[float], replay: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    y = np.array([r["s"] for r in rows])
    kinds = np.array([r["kind"] for r in rows])
    for kind, m in (("decode", "o"), ("prefill", "s")):
        sel = kinds == kind
        axes[0].scatter(y[sel] * 1e3, np.array(pred)[sel] * 1e3, marker=m, s=14, label=kind)
    lim = [y.min() * 1e3 * 0.8, y.max() * 1e3 * 1.2]
    axes[0].plot(lim, lim, "k:", lw=1)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("measured step (ms)")
    axes[0].set_ylabel("cost model (ms)")
    axes[0].set_title("engine step times")
    axes[0].legend()
    for ax, key, title in ((axes[1], "ttft", "time to first token"), (axes[2], "e2e", "end-to-end latency")):
        for name, data in (("measured", replay["real_raw"][key]), ("simulated", replay["sim_raw"][key])):
            xs = np.sort(np.asarray(data))
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"replay: {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_calibration(*, out: Path, requests: int = 32, rate: float | None = None, threads: int = 2, quick: bool = False,
                    seed: int = 0, progress: bool = False, bench: Path | None = BENCH) -> dict[str, Any]:
    """Measure, fit, replay; write ``out`` (JSON), the fitted spec (.toml) and a plot (.png)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[calibrate {time.perf_counter() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e.strerror or e}") from None
    import torch

    torch.set_num_threads(threads)
    from mlsyskit.cluster.model import model_from_gguf
    from mlsyskit.engine import LLM, default_model_path, load_checkpoint

    gguf = default_model_path()
    model = model_from_gguf(gguf)
    # the engine dequantizes to fp32 and keeps its KV cache in fp32
    model = ModelSpec(**{**model.__dict__, "weight_dtype_bytes": 4.0, "kv_dtype_bytes": 4.0, "weight_bytes_override": None})
    ckpt = load_checkpoint(gguf)

    def new_llm() -> Any:
        return LLM(ckpt, max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS, block_size=BLOCK)

    llm = new_llm()
    num_blocks = llm.engine.block_manager.num_blocks
    rng = np.random.default_rng(seed)
    grid = ({"prefill": [64, 256], "contexts": [32, 256], "batches": [1, 8], "decode_steps": 3, "reps": 2, "max_tokens_in_flight": 4096}
            if quick else
            {"prefill": [32, 128, 512, 1024], "contexts": [32, 256, 512], "batches": [1, 4, 16, 32], "decode_steps": 5,
             "reps": 3, "max_tokens_in_flight": 4096})
    say(f"model {gguf.name} (fp32), {threads} threads, KV pool {num_blocks} blocks; load {_load()}")
    from mlsyskit.engine import SamplingParams

    # warm-up: first calls allocate and initialise (a first prefill measured 2x slower)
    llm.generate([rng.integers(200, 40000, size=n).tolist() for n in (64, 300, 300, 300)],
                 SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    load_measure = [_load()]
    rows = measure_steps(llm, grid, rng, say)
    load_measure.append(_load())
    del llm
    med = median_rows(rows)
    fit = fit_cost(med, model)
    say(f"fit: {fit['flops'] / 1e9:.1f} GFLOP/s, {fit['bandwidth'] / 1e9:.2f} GB/s, overheads {fit['params']}; "
        f"step error mean {fit['step_fit']['mean_abs_rel_error']:.1%}")
    toml_path = out.with_suffix(".toml")
    toml_path.write_text(fitted_spec_toml(model, gguf, fit, num_blocks))
    spec = load_spec(toml_path)

    # -- replay: an engine_throughput-shaped Poisson workload, real engine vs simulator ----------
    n = 8 if quick and requests == 32 else requests
    wrng = np.random.default_rng(seed + 1)
    prompt_lens = wrng.integers(16, 257, size=n).tolist()
    out_lens = wrng.integers(16, 97, size=n).tolist()
    if rate is None:  # 0.7 x what the fitted engine sustains with everything arriving at once
        together = simulate(spec, Workload([0.0] * n, prompt_lens, out_lens, ["x"] * n), make_policy("lot"))
        rate = round(0.7 * n / max(together.t_finish), 4)
    gaps = wrng.exponential(1.0 / rate, size=n)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()
    vocab = model.vocab
    prompts = [wrng.integers(200, vocab - 200, size=p).tolist() for p in prompt_lens]
    say(f"replay: {n} requests at {rate} req/s (last arrival {arrivals[-1]:.0f} s), real engine")
    real = serve_real(new_llm, prompts, out_lens, arrivals)
    wl = Workload(arrivals, prompt_lens, out_lens, ["replay"] * n, rate=rate)
    res = simulate(spec, wl, make_policy("lot"))
    real_stats = _stats(real["ttft"], real["e2e"], real["tokens"], real["span"])
    sim_stats = _sim_stats(res)
    replay = compare(sim_stats, real_stats)
    replay.update({"requests": n, "rate": rate, "real_preemptions": real["preemptions"], "sim_preemptions": int(sum(res.preemptions)),
                   "real_steps": real["steps"], "loadavg_1m": real["loadavg_1m"],
                   "real_raw": {"ttft": real["ttft"], "e2e": real["e2e"]},
                   "sim_raw": {"ttft": per_request(res)["ttft"].tolist(), "e2e": per_request(res)["e2e"].tolist()}})
    say(f"replay measured {real_stats}, simulated {sim_stats}")

    # -- the committed benchmark's Poisson run, replayed in the simulator -------------------------
    bench_cmp: dict[str, Any] | None = None
    if bench is not None and Path(bench).is_file():
        try:
            b = json.loads(Path(bench).read_text())
            wlb = b["workload"]
            ours = b["systems"]["ours"]["poisson"]
            arr = wlb["poisson"]["arrivals_s"]
            bw = Workload(arr, wlb["prompt_lens"], wlb["output_lens"], ["bench"] * len(arr), rate=wlb["poisson"]["rate_req_s"])
            rb = simulate(spec, bw, make_policy("lot"))
            measured = {"throughput_tok_s": ours["throughput_tok_s"], "ttft_p50": ours["ttft_p50_s"], "ttft_p99": ours["ttft_p99_s"],
                        "e2e_p50": ours["e2e_p50_s"], "e2e_p99": ours["e2e_p99_s"]}
            bench_cmp = compare(_sim_stats(rb), measured)
            # The machine's speed that day: its own batch-1 decode (64-token prompt, 64 tokens),
            # against the fitted model's; every step time scales by the ratio.
            b1 = b["systems"]["ours"].get("decode_tok_s_batch1")
            if b1:
                today = spec.instances[0].cost.decode_run_time(1, 64.0, 64) / 64
                k = (1.0 / b1) / today
                scaled = scaled_spec(spec, k)
                bench_cmp["scaled_to_that_day"] = {
                    "step_time_factor": round(k, 4),
                    "basis": f"batch-1 decode: {b1} tok/s measured that day, {1 / today:.2f} tok/s by today's fit",
                    **compare(_sim_stats(simulate(scaled, bw, make_policy("lot"))), measured)}
            bench_cmp.update({"file": str(bench), "requests": len(arr), "rate": wlb["poisson"]["rate_req_s"],
                              "measured_on": b.get("created"), "measured_loadavg": b.get("host", {}).get("loadavg_start"),
                              "note": "measured on another day at another machine load; the fit is of today's machine"})
        except (KeyError, TypeError, ValueError) as e:
            bench_cmp = {"error": f"could not replay {bench}: {e}"}

    report = {
        "calibration": "cluster",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["mlsyskit", *sys.argv[1:]]) if sys.argv and "mlsyskit" in sys.argv[0] else None,
        "model": {"gguf": str(gguf), **model.summary()},
        "threads": threads,
        "engine": {"max_num_batched_tokens": BUDGET, "max_num_seqs": MAX_SEQS, "block_size": BLOCK, "num_kv_blocks": num_blocks, "dtype": "fp32"},
        "grid": grid,
        "loadavg_1m_during_measurement": load_measure,
        "fit": {"flops_per_s": fit["flops"], "bytes_per_s": fit["bandwidth"],
                "step_overhead_ms": round(fit["params"].step_overhead_s * 1e3, 4),
                "seq_overhead_ms": round(fit["params"].seq_overhead_s * 1e3, 4),
                "token_overhead_us": round(fit["params"].token_overhead_s * 1e6, 4),
                "kv_overhead_ns": round(fit["params"].kv_overhead_s * 1e9, 4),
                **fit["step_fit"]},
        "steps": [{**r, "predicted_s": round(p, 6)} for r, p in zip(med, fit["predicted"], strict=True)],
        "raw_steps": rows,
        "fitted_spec": str(toml_path),
        "comparison": {"replay": {k: v for k, v in replay.items() if not k.endswith("_raw")}, "benchmark": bench_cmp},
        "replay_per_request": {"real": replay["real_raw"], "sim": replay["sim_raw"], "arrivals": arrivals,
                               "prompt_lens": prompt_lens, "output_lens": out_lens},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_json(out, report)
    try:
        _plot(med, fit["predicted"], replay, out.with_suffix(".png"))
    except Exception as e:  # the chart is a convenience
        say(f"no plot: {e}")
    say(f"wrote {out}, {toml_path} and {out.with_suffix('.png')}")
    return report
