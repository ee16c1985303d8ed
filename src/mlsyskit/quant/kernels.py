"""Fast CPU kernels for weight-only quantized linear layers at small batch (LLM decode).

PyTorch's own CPU paths for low-bit weights (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
are slower than an fp32 GEMV on AVX2 machines without VNNI, so decode would gain nothing from
smaller weights. ``csrc/gemv.c`` reads the int8 / packed int4 weights once, converts them to
fp32 in registers and accumulates with FMAs: 4x / 8x fewer bytes than fp32 per token.

The C file is compiled on first use with the system C compiler (``cc -O3 -mavx2 -mfma
-fopenmp``) into the cache (``$MLSYSKIT_CACHE_DIR/kernels``, named by a hash of source and
flags, written atomically) and called through ``ctypes``. Without a compiler, without AVX2, or
with ``MLSYSKIT_KERNELS=0`` :func:`available` is False and callers use the plain PyTorch path
(dequantize, then matmul); :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from mlsyskit.data.paths import default_cache_dir

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 8  # the kernels keep one accumulator per row in registers (MAXB in gemv.c)
BLOCK = 32  # K and group sizes must be multiples of this


@cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("MLSYSKIT_KERNELS", "1") == "0":
        return None, "disabled by MLSYSKIT_KERNELS=0"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc/gcc) found"
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = default_cache_dir() / "kernels" / f"gemv-{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            proc = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(tmp_so)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                return (
                    None,
                    f"compiling {SOURCE.name} failed: {proc.stderr.strip().splitlines()[-1:]}",
                )
            os.replace(tmp_so, out)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gemv_q8.argtypes = [p, p, p, p, i, i, i, i, i]
    lib.gemv_q4.argtypes = lib.gemv_q8z.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
    lib.gemv_q8.restype = lib.gemv_q4.restype = lib.gemv_q8z.restype = None
    return lib, f"compiled {out}"


def available() -> bool:
    """Whether the compiled kernels can be used on this machine."""
    return _library()[0] is not None


def status() -> str:
    """Why the kernels are (not) in use, in a few words."""
    return _library()[1]


def supports(in_features: int, group_size: int) -> bool:
    """Whether a weight of this shape/grouping has a kernel (else: dequantize + matmul)."""
    return (
        available()
        and in_features % BLOCK == 0
        and group_size % BLOCK == 0
        and in_features % group_size == 0
    )


def q8_gemv(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """``x`` (B, K) float32, ``codes`` (N, K) int8, ``scale`` (N, G) float32 → (B, N) with weights
    ``scale * (code - zero)`` (``zero`` (N, G) float32, or None for symmetric codes)."""
    lib = _library()[0]
    B, K = x.shape
    N, G = scale.shape
    y = torch.empty(B, N, dtype=torch.float32)
    x = x.contiguous()
    if zero is not None:
        xsum = torch.empty(B, G, dtype=torch.float32)
        lib.gemv_q8z(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), xsum.data_ptr(),
                     y.data_ptr(), B, N, K, K // G, torch.get_num_threads())
        return y
    lib.gemv_q8(
        x.data_ptr(),
        codes.data_ptr(),
        scale.data_ptr(),
        y.data_ptr(),
        B,
        N,
        K,
        K // G,
        torch.get_num_threads(),
    )
    return y


def q4_gemv(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``x`` (B, K) float32, ``packed`` (N, K/2) uint8 in :func:`pack_q4_blocks` layout, ``scale``
    and ``zero`` (N, G) float32 → (B, N) with weights ``scale * (code - zero)``."""
    lib = _library()[0]
    B, K = x.shape
    N, G = scale.shape
    y = torch.empty(B, N, dtype=torch.float32)
    xsum = torch.empty(B, G, dtype=torch.float32)
    x = x.contiguous()
    lib.gemv_q4(
        x.data_ptr(),
        packed.data_ptr(),
        scale.data_ptr(),
        zero.data_ptr(),
        xsum.data_ptr(),
        y.data_ptr(),
        B,
        N,
        K,
        K // G,
        torch.get_num_threads(),
    )
    return y


def pack_q4_blocks(codes: Tensor) -> Tensor:
    """Codes 0..15 (N, K) → (N, K/2) uint8: in each 32-wide block, byte j holds element j (low
    nibble) and element j + 16 (high nibble), so the kernel unpacks 32 values with two masks."""
    N, K = codes.shape
    c = codes.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_q4_blocks(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_q4_blocks`: (N, K/2) uint8 → (N, K) uint8 codes."""
    N, half = packed.shape
    p = packed.view(N, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack((p & 0x0F, p >> 4), dim=2).reshape(N, 2 * half)
