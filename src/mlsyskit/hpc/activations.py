"""`mlsyskit hpc activations`: what each activation function costs, forward and backward.

ReLU, Sigmoid, Tanh, GELU (exact erf and tanh approximation), SiLU on one float32 tensor:
forward time with autograd recording, forward time without (inference), backward time, the
bytes autograd saves for backward (counted exactly with saved_tensors_hooks: ReLU, Sigmoid and
Tanh keep their output, GELU and SiLU their input), and torch.profiler's view (per-operator
CPU time and allocated memory). One Chrome trace of a forward + backward of each is exported.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlsyskit.errors import UserError
from mlsyskit.hpc import machine

ACTIVATIONS: dict[str, Any] = {
    "relu": lambda: nn.ReLU(),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "gelu": lambda: nn.GELU(),
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
}


@dataclass
class ActivationConfig:
    numel: int = 1 << 22
    repeat: int = 10
    out: str = "runs/hpc"
    threads: int | None = None
    names: tuple[str, ...] = tuple(ACTIVATIONS)

    def validate(self) -> None:
        if self.numel < 1:
            raise UserError(f"--numel must be at least 1, got {self.numel}")
        if self.repeat < 1:
            raise UserError(f"--repeat must be at least 1, got {self.repeat}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        bad = [n for n in self.names if n not in ACTIVATIONS]
        if bad:
            raise UserError(f"unknown activation(s) {', '.join(bad)}; choose from {', '.join(ACTIVATIONS)}")


def saved_bytes(fn: nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    """Bytes autograd keeps for backward when ``fn(x)`` is recorded (each storage counted
    once), and which tensors they are ("input" / "output" / a shape)."""
    seen: dict[int, int] = {}
    what: list[str] = []
    out_ptr: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        seen.setdefault(ptr, t.untyped_storage().nbytes())
        what.append("input" if ptr == x.untyped_storage().data_ptr() else f"other {tuple(t.shape)}")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    out_ptr.append(y.untyped_storage().data_ptr())
    what = ["output" if w.startswith("other") and ptr == out_ptr[0] else w
            for w, ptr in zip(what, seen, strict=False)]
    return sum(seen.values()), what


def _best_time(fn: Any, repeat: int) -> float:
    """Best of ``repeat`` (on a shared machine the minimum is the run least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(name: str, numel: int, repeat: int) -> dict[str, Any]:
    fn = ACTIVATIONS[name]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g).requires_grad_(True)
    grad = torch.randn(numel, generator=g)
    saved, what = saved_bytes(fn, x)
    fn(x).backward(grad)  # warm-up: first-touch page faults, lazy initialisation
    x.grad = None
    with torch.no_grad():
        infer = _best_time(lambda: fn(x), repeat)
    fwd = _best_time(lambda: fn(x), repeat)
    bwd_times = []
    for _ in range(repeat):
        y = fn(x)
        t0 = time.perf_counter()
        y.backward(grad)
        bwd_times.append(time.perf_counter() - t0)
        x.grad = None
    bwd = min(bwd_times)
    nbytes = numel * 4
    return {
        "name": name, "numel": numel, "forward_ms": fwd * 1e3, "forward_nograd_ms": infer * 1e3, "backward_ms": bwd * 1e3,
        # forward reads x and writes y; backward reads the saved tensor and grad_out, writes grad_in
        "forward_gbs": 2 * nbytes / fwd / 1e9, "backward_gbs": 3 * nbytes / bwd / 1e9,
        "saved_bytes": saved, "saved_bytes_per_element": saved / numel, "saved": what,
    }


def profile(names: tuple[str, ...], numel: int, trace: Path) -> dict[str, dict[str, Any]]:
    """One forward + backward of each under torch.profiler (memory on); the Chrome trace is
    written to ``trace``. Per activation: its operators' self CPU time and allocated bytes."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    g = torch.Generator().manual_seed(1)
    grad = torch.randn(numel, generator=g)
    per: dict[str, dict[str, Any]] = {}
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        for name in names:
            fn = ACTIVATIONS[name]()
            x = torch.randn(numel, generator=g).requires_grad_(True)
            with record_function(f"{name} forward"):
                y = fn(x)
            with record_function(f"{name} backward"):
                y.backward(grad)
            del x, y
    prof.export_chrome_trace(str(trace))
    for evt in prof.key_averages():
        for name in names:
            for phase in ("forward", "backward"):
                if evt.key == f"{name} {phase}":
                    per.setdefault(name, {})[f"profiler_{phase}_cpu_ms"] = evt.cpu_time_total / 1e3
                    per[name][f"profiler_{phase}_alloc_bytes"] = int(evt.cpu_memory_usage)
    return per


def run_activations(cfg: ActivationConfig) -> dict[str, Any]:
    from mlsyskit.runtime import keep_freed_memory

    cfg.validate()
    # each forward allocates a new output: without this every call pays page faults on freshly
    # mmap'ed memory, and the first activation measured pays the most
    keep_freed_memory()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    load_before = machine.load()
    try:
        rows = [measure(n, cfg.numel, cfg.repeat) for n in cfg.names]
        trace = out / "hpc_activations_trace.json"
        prof = profile(cfg.names, cfg.numel, trace)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    for r in rows:
        r.update(prof.get(r["name"], {}))
    result = {"rows": rows, "numel": cfg.numel, "threads": threads, "cpu": machine.cpu_info(),
              "torch": torch.__version__, "config": dataclasses.asdict(cfg), "loadavg_before": load_before,
              "loadavg_after": machine.load(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "json": str(out / "hpc_activations.json"), "png": str(out / "hpc_activations.png"), "trace": str(trace)}
    from mlsyskit.runtime import write_json

    write_json(out / "hpc_activations.json", result)
    plot(result, out / "hpc_activations.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.bar(x - 0.27, [r["forward_nograd_ms"] for r in rows], 0.27, label="forward, no grad")
    ax.bar(x, [r["forward_ms"] for r in rows], 0.27, label="forward, recorded")
    ax.bar(x + 0.27, [r["backward_ms"] for r in rows], 0.27, label="backward")
    ax.set(xticks=x, xticklabels=names, ylabel="ms (best of --repeat)",
           title=f"{result['numel']:,} float32 elements, {result['threads']} thread(s)")
    ax.legend(fontsize=8)
    ax2.bar(x, [r["saved_bytes"] / 2**20 for r in rows], color="tab:green")
    ax2.set(xticks=x, xticklabels=names, ylabel="MiB saved for backward",
            title="activation memory kept for backward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = [f"{'activation':10} {'fwd ms':>8} {'fwd no-grad':>11} {'bwd ms':>8} {'fwd GB/s':>9} {'saved MiB':>9}  saved"]
    for r in result["rows"]:
        lines.append(f"{r['name']:10} {r['forward_ms']:>8.2f} {r['forward_nograd_ms']:>11.2f} {r['backward_ms']:>8.2f} "
                     f"{r['forward_gbs']:>9.1f} {r['saved_bytes'] / 2**20:>9.1f}  {', '.join(r['saved'])}")
    lines.append(f"{result['numel']:,} elements, {result['threads']} thread(s); written {result['json']}, "
                 f"{result['png']} and the Chrome trace {result['trace']}")
    return "\n".join(lines)
