"""What this CPU is and what it could do: model, logical CPUs, SIMD flags, clock, the
nominal peak GFLOP/s they imply, the measured memory bandwidth, and the load while measuring."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "logical_cpus": len(os.sched_getaffinity(0))}
    flags: set[str] = set()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and info["model"] in ("", platform.machine()):
                info["model"] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and mhz is None:
                mhz = float(value)
    except OSError:
        pass
    info["mhz"] = mhz
    info["simd"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return info


def nominal_peak(info: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s per logical CPU and in all from the flags and the reported clock, assuming 2 FMA
    units per core (AVX-512 server cores; AVX2 cores have 2 too). An upper bound that ignores
    turbo, frequency drops under AVX-512 and hyperthreads sharing one core's units."""
    simd = set(info.get("simd", []))
    lanes32 = 16 if "avx512f" in simd else 8 if "avx2" in simd else 4
    fma = 2 if ("fma" in simd or "avx512f" in simd) else 1
    per_cycle32 = lanes32 * 2 * fma  # 2 flops per FMA, 2 units
    ghz = (info.get("mhz") or 0) / 1000
    out = {
        "assumption": f"{lanes32} fp32 lanes x 2 flops (FMA) x {fma} units x {ghz:.2f} GHz per logical CPU",
        "fp32_per_cpu_gflops": per_cycle32 * ghz, "fp64_per_cpu_gflops": per_cycle32 * ghz / 2,
        "fp32_all_gflops": per_cycle32 * ghz * info["logical_cpus"],
        "fp64_all_gflops": per_cycle32 * ghz / 2 * info["logical_cpus"],
    }
    if "amx_bf16" in simd:
        out["note"] = "AMX-BF16 tiles: up to 1024 bf16 flop/cycle per core, far above the AVX-512 peak"
    return out


def memory_bandwidth_gbs(mib: int = 64, repeat: int = 5) -> float:
    """Best copy bandwidth of one thread (numpy copyto, bytes read + written), GB/s."""
    a = np.ones(mib * 2**20 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
