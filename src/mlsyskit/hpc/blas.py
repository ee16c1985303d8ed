"""`mlsyskit hpc blas`: matrix multiply and inversion, GFLOP/s against this CPU's peak.

numpy (its BLAS named by threadpoolctl) and torch (MKL / oneDNN on x86), float32, float64
and bfloat16 (torch only: numpy has no bfloat16), with 1 thread and with every usable CPU.
Flops: 2n^3 for an n x n multiply, 2n^3 for an inversion (LU and triangular inverses).
Arithmetic intensity: flops over the bytes of the operands and the result (3n^2 words for a
multiply, 2n^2 for an inversion). The roofline plot puts every measurement under the
ceilings: the nominal and the measured compute peaks and the measured memory bandwidth.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsyskit.errors import UserError
from mlsyskit.hpc import machine

DTYPES = ("float32", "float64", "bfloat16")
LIBRARIES = ("numpy", "torch")
OPS = ("matmul", "inv")
BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}


@dataclass
class BlasConfig:
    sizes: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    libraries: list[str] = field(default_factory=lambda: list(LIBRARIES))
    ops: list[str] = field(default_factory=lambda: list(OPS))
    threads: list[int] | None = None  # default: 1 and every usable CPU
    repeat: int = 3
    out: str = "runs/hpc"

    def validate(self) -> None:
        for name, allowed in (("dtypes", DTYPES), ("libraries", LIBRARIES), ("ops", OPS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise UserError(f"--{name} {','.join(getattr(self, name))}: choose from {','.join(allowed)}")
        if not self.sizes or min(self.sizes) < 1:
            raise UserError("--sizes must be positive integers")
        if self.repeat < 1:
            raise UserError(f"--repeat must be at least 1, got {self.repeat}")


def blas_info() -> dict[str, Any]:
    from threadpoolctl import threadpool_info

    numpy_blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
                  for i in threadpool_info() if i.get("user_api") == "blas"]
    import re

    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    torch_blas = found.group(1) if found else "unknown"
    return {"numpy": numpy_blas, "torch": {"blas": torch_blas, "mkl": torch.backends.mkl.is_available(),
                                           "mkldnn": torch.backends.mkldnn.is_available(), "version": torch.__version__}}


def _operands(lib: str, dtype: str, n: int, op: str) -> tuple[Any, Any]:
    g = np.random.default_rng(n)
    a = g.standard_normal((n, n))
    if op == "inv":
        a += n * np.eye(n)  # diagonally dominant: well conditioned
    b = g.standard_normal((n, n))
    if lib == "numpy":
        return a.astype(dtype), b.astype(dtype)
    t = getattr(torch, dtype)
    return torch.from_numpy(a).to(t), torch.from_numpy(b).to(t)


def _run_once(lib: str, op: str, a: Any, b: Any) -> Any:
    if lib == "numpy":
        return a @ b if op == "matmul" else np.linalg.inv(a)
    return a @ b if op == "matmul" else torch.linalg.inv(a)


class _Threads:
    """Limit numpy's BLAS (threadpoolctl) and torch's intra-op pool to ``n`` threads."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> _Threads:
        from threadpoolctl import threadpool_limits

        self.limits = threadpool_limits(limits=self.n, user_api="blas")
        self.torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        self.limits.restore_original_limits()
        torch.set_num_threads(self.torch_threads)


def measure(lib: str, dtype: str, op: str, n: int, threads: int, repeat: int) -> dict[str, Any]:
    """One row: best time of ``repeat`` runs after a warm-up, GFLOP/s, arithmetic intensity."""
    row: dict[str, Any] = {"library": lib, "dtype": dtype, "op": op, "n": n, "threads": threads}
    if lib == "numpy" and dtype == "bfloat16":
        return {**row, "unsupported": "numpy has no bfloat16"}
    a, b = _operands(lib, dtype, n, op)
    with _Threads(threads):
        try:
            t0 = time.perf_counter()
            _run_once(lib, op, a, b)
            first = time.perf_counter() - t0
        except (RuntimeError, TypeError, np.linalg.LinAlgError) as e:
            return {**row, "unsupported": str(e).splitlines()[0][:200]}
        best = first
        for _ in range(repeat if first < 2.0 else 0):  # a slow size is timed once
            t0 = time.perf_counter()
            _run_once(lib, op, a, b)
            best = min(best, time.perf_counter() - t0)
    flops = 2.0 * n**3
    words = (3 if op == "matmul" else 2) * n * n
    return {**row, "seconds": best, "gflops": flops / best / 1e9, "intensity": flops / (words * BYTES[dtype]),
            "max_rel_error": _error(lib, op, a, b)}


def _error(lib: str, op: str, a: Any, b: Any) -> float:
    """Untimed check of the result against float64: max |C - A B| / max |A B| for a multiply,
    max |A X - I| for an inversion X."""
    as64 = (lambda t: t.astype(np.float64)) if lib == "numpy" else (lambda t: t.double().numpy())  # noqa: E731
    out = as64(_run_once(lib, op, a, b))
    a64 = as64(a)
    if op == "matmul":
        ref = a64 @ as64(b)
        return float(np.abs(out - ref).max() / np.abs(ref).max())
    return float(np.abs(a64 @ out - np.eye(len(out))).max())


def run_blas(cfg: BlasConfig, progress: bool | None = None) -> dict[str, Any]:
    """Every (library, dtype, op, size, threads) row, the peaks, and the JSON + PNG files."""
    from mlsyskit.runtime import show_progress

    cfg.validate()
    all_threads = len(os.sched_getaffinity(0))
    threads = cfg.threads or sorted({1, all_threads})
    info = machine.cpu_info()
    load_before = machine.load()
    combos = [(lib, dt, op, n, t) for t in threads for lib in cfg.libraries for dt in cfg.dtypes
              for op in cfg.ops for n in cfg.sizes]
    bar = None
    if show_progress(progress):
        from tqdm import tqdm

        bar = tqdm(total=len(combos), desc="blas", unit="run", leave=False)
    rows = []
    for lib, dt, op, n, t in combos:
        rows.append(measure(lib, dt, op, n, t, cfg.repeat))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    timed = [r for r in rows if "gflops" in r]
    best = {f"{dt}_{t}t": max((r["gflops"] for r in timed if r["dtype"] == dt and r["threads"] == t), default=None)
            for dt in cfg.dtypes for t in threads}
    peak = {**machine.nominal_peak(info), "measured_best_gflops": best,
            "memory_bandwidth_gbs_1thread": machine.memory_bandwidth_gbs()}
    nominal = {"float32": peak["fp32_per_cpu_gflops"], "float64": peak["fp64_per_cpu_gflops"], "bfloat16": peak["fp32_per_cpu_gflops"]}
    for r in timed:
        r["fraction_of_nominal_peak"] = r["gflops"] / (nominal[r["dtype"]] * r["threads"]) if nominal[r["dtype"]] else None
        ref = best.get(f"{r['dtype']}_{r['threads']}t")
        r["fraction_of_measured_best"] = r["gflops"] / ref if ref else None
    result = {"cpu": info, "blas": blas_info(), "peak": peak, "rows": rows, "threads": threads,
              "config": dataclasses.asdict(cfg), "loadavg_before": load_before, "loadavg_after": machine.load(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    best_row = max(timed, key=lambda r: r["gflops"], default=None)
    result["best"] = {k: best_row[k] for k in ("library", "dtype", "op", "n", "threads", "gflops")} if best_row else None
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    result["json"], result["png"] = str(out / "hpc_blas.json"), str(out / "hpc_blas.png")
    from mlsyskit.runtime import write_json

    write_json(out / "hpc_blas.json", result)
    plot(result, out / "hpc_blas.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "gflops" in r]
    peak, threads = result["peak"], result["threads"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colours = {("numpy", "float32"): "tab:blue", ("numpy", "float64"): "tab:cyan", ("torch", "float32"): "tab:red",
               ("torch", "float64"): "tab:orange", ("torch", "bfloat16"): "tab:purple"}
    ai = np.logspace(-1, 3, 100)
    bw = peak["memory_bandwidth_gbs_1thread"]
    for t, style in zip(threads, ("--", "-"), strict=False):
        fp32 = peak["fp32_per_cpu_gflops"] * t
        if fp32:
            ax.plot(ai, np.minimum(fp32, bw * ai), "k" + style, lw=1, label=f"nominal fp32 roof, {t} thread(s)")
        meas = peak["measured_best_gflops"].get(f"float32_{t}t")
        if meas:
            ax.axhline(meas, color="grey", ls=style, lw=0.8, label=f"measured best fp32, {t} thread(s)")
    for r in rows:
        ax.scatter(r["intensity"], r["gflops"], color=colours.get((r["library"], r["dtype"]), "k"),
                   marker="o" if r["op"] == "matmul" else "^", s=16 + 14 * (r["threads"] > 1), alpha=0.8)
    for (lib, dt), c in colours.items():
        ax.scatter([], [], color=c, label=f"{lib} {dt}")
    ax.scatter([], [], color="k", marker="^", label="inversion (o: matmul)")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (flop/byte)", ylabel="GFLOP/s",
           title=f"roofline: {result['cpu']['model']}, {result['cpu']['logical_cpus']} logical CPUs")
    ax.legend(fontsize=7, loc="lower right")
    for (lib, dt), c in colours.items():
        for t, style in zip(threads, ("--", "-"), strict=False):
            pts = sorted((r["n"], r["gflops"]) for r in rows if (r["library"], r["dtype"], r["op"], r["threads"]) == (lib, dt, "matmul", t))
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, color=c, marker=".", label=f"{lib} {dt} {t}t")
    ax2.set(xscale="log", yscale="log", xlabel="n (n x n matmul)", ylabel="GFLOP/s", title="matmul: 1 thread (dashed) vs all (solid)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = [f"{'library':7} {'dtype':9} {'op':6} {'n':>5} {'thr':>3} {'GFLOP/s':>9} {'of peak':>8}  note"]
    for r in result["rows"]:
        if "gflops" in r:
            frac = r.get("fraction_of_nominal_peak")
            lines.append(f"{r['library']:7} {r['dtype']:9} {r['op']:6} {r['n']:>5} {r['threads']:>3} {r['gflops']:>9.1f} "
                         f"{'' if frac is None else f'{100 * frac:.0f}%':>8}")
        else:
            lines.append(f"{r['library']:7} {r['dtype']:9} {r['op']:6} {r['n']:>5} {r['threads']:>3} {'-':>9} {'':>8}  {r['unsupported']}")
    p = result["peak"]
    lines.append(f"nominal peak fp32 {p['fp32_per_cpu_gflops']:.0f} GFLOP/s per logical CPU ({p['assumption']}); "
                 f"copy bandwidth {p['memory_bandwidth_gbs_1thread']:.1f} GB/s (1 thread)")
    lines.append(f"numpy BLAS: {', '.join(b['internal_api'] + ' ' + str(b['version']) for b in result['blas']['numpy']) or 'none found'}; "
                 f"torch BLAS: {result['blas']['torch']['blas']}; written {result['json']} and {result['png']}")
    return "\n".join(lines)
