"""Compiled CPU kernels: matmuls on block-quantized weights, and paged decode attention.

``csrc/qmatmul.c`` computes ``x W^T`` directly on 32-element weight blocks (GGUF's Q4_0, Q4_1,
Q8_0 as the file stores them, and the int4/int8 layouts of ``mlsyskit quantize``) with the
activations quantized to int8 per block and integer dot products, as llama.cpp does;
``csrc/attention.c`` is decode attention that reads the paged KV cache in place. Decode at
batch 1 reads every weight once per token, so bytes per weight set the speed: ~0.6 for Q4_1
against 4 for float32.

The C files are built on first use with the system C compiler, once per instruction-set
**variant**, into the cache (``$MLSYSKIT_CACHE_DIR/kernels``, named by a hash of sources and
flags, written atomically) and called through ``ctypes``:

- ``avx512vnni``: AVX-512 with VNNI (``vpdpbusd``: 4 int8 products per 32-bit lane);
- ``avxvnni``: the same instruction on 256 bits (VEX), for CPUs without AVX-512;
- ``avx2``: ``pmaddubsw`` + ``pmaddwd``;
- ``generic``: portable C (any CPU the compiler targets).

The variant is chosen at run time from what the CPU has *and the OS enables*: the generic build
(always compiled first) reads CPUID and XCR0 (``xgetbv``) in ``csrc/cpu.c``; a CPU that lists
AVX-512 in /proc/cpuinfo under an OS (or hypervisor) that does not save its registers gets the
AVX2 build. ``MLSYSKIT_KERNEL_VARIANT=avx2`` forces one (if the CPU can run it). Without a
compiler, or with ``MLSYSKIT_KERNELS=0``, :func:`available` is False, callers fall back to
PyTorch (dequantized weights) and :func:`warn_unavailable` says so once per process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsyskit.data.paths import default_cache_dir

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("cpu.c", "qmatmul.c", "attention.c", "decode.c")
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# csrc/qmatmul.c: up to this many activation rows each row's products are summed as for a lone
# row (tiles); from GEMM_ROWS (8) on, lane-wise, in another order (float rounding differs)
TILE_ROWS = 7
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
# best first: (name, compiler flags, CPU features it needs)
VARIANTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("avx512vnni", ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                    "-mavx512dq", "-mavx512vnni"), ("avx2", "fma", "f16c", "avx512", "avx512_vnni")),
    ("avxvnni", ("-mavx2", "-mfma", "-mf16c", "-mavxvnni"), ("avx2", "fma", "f16c", "avx_vnni")),
    ("avx2", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
    ("generic", (), ()),
)
# bits of mlsk_cpu_features() (csrc/cpu.c)
FEATURE_BITS = {"avx2": 0, "fma": 1, "f16c": 2, "avx512": 3, "avx512_vnni": 4, "avx_vnni": 5,
                "avx512_bf16": 6, "amx_bf16": 7, "amx_int8": 8}
BLOCK = 32  # elements per quantization block; K and group sizes must be multiples of it

# weight formats of csrc/qmatmul.c and the bytes of one 32-element block in each
FORMATS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "U4": 100, "I8": 101}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "U4": 16, "I8": 32}


class _Part(ctypes.Structure):
    """``qpart_t`` in csrc/qmatmul.c."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("format", ctypes.c_int32),
        ("rows", ctypes.c_int32),
        ("col0", ctypes.c_int32),
        ("group_blocks", ctypes.c_int32),
    ]


class DecodeLayer(ctypes.Structure):
    """``layer_t`` in csrc/decode.c: one Llama-family layer's weights and KV pools."""

    _fields_ = [
        ("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
        ("n_qkv", ctypes.c_int32), ("n_o", ctypes.c_int32), ("n_gate_up", ctypes.c_int32), ("n_down", ctypes.c_int32),
        ("qkv_bias", ctypes.c_void_p), ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
        ("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p),
    ]


class DecodeDims(ctypes.Structure):
    """``dims_t`` in csrc/decode.c: sizes, norm epsilon and the RoPE tables."""

    _fields_ = [
        ("dim", ctypes.c_int32), ("hidden", ctypes.c_int32), ("H", ctypes.c_int32), ("Hkv", ctypes.c_int32),
        ("D", ctypes.c_int32), ("block_size", ctypes.c_int32), ("kv_fp16", ctypes.c_int32), ("eps", ctypes.c_float),
        ("cos", ctypes.c_void_p), ("sin_signed", ctypes.c_void_p),
    ]


# -- building and loading ---------------------------------------------------------------------


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@cache
def _build(variant: str) -> tuple[Path | None, str]:
    """Compile (or find in the cache) the shared library of one variant: (path, message)."""
    flags = dict((name, f) for name, f, _ in VARIANTS)[variant]
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc/gcc) found"
    cmd_flags = [*COMMON_FLAGS, *flags]
    srcs = [CSRC / s for s in SOURCES]
    digest = hashlib.sha256(
        b"".join(s.read_bytes() for s in srcs) + " ".join([compiler, *cmd_flags]).encode()
    ).hexdigest()[:16]
    out = default_cache_dir() / "kernels" / f"mlsk-{variant}-{digest}.so"
    if out.exists():
        return out, f"cached {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        try:
            proc = subprocess.run(
                [compiler, *cmd_flags, *map(str, srcs), "-o", str(tmp_so), "-lm"],
                capture_output=True, text=True, timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"running {compiler} failed: {exc}"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"compiling the {variant} kernels failed: {last}"
        os.replace(tmp_so, out)  # atomic: concurrent processes never load a half-written file
    return out, f"compiled {out}"


@dataclass(frozen=True)
class Library:
    """One loaded variant of the kernels; the functions below take it as ``lib=``."""

    variant: str
    path: Path
    dll: Any


def _load(variant: str) -> tuple[Library | None, str]:
    path, msg = _build(variant)
    if path is None:
        return None, msg
    dll = ctypes.CDLL(str(path))
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    dll.mlsk_cpu_features.restype = ctypes.c_int
    dll.mlsk_variant.restype = ctypes.c_char_p
    dll.mlsk_qmatmul.argtypes = [p, i64, i, i, p, i, p, i64, i]
    dll.mlsk_qmatmul.restype = ctypes.c_int
    dll.mlsk_dequantize.argtypes = [p, i, i, p, i, i]
    dll.mlsk_dequantize.restype = None
    dll.mlsk_gather_rows.argtypes = [p, p, i, i, p]
    dll.mlsk_gather_rows.restype = None
    dll.mlsk_attn_decode.argtypes = [p, i64, p, i64, p, i64, p, p, p, i, p, i, p, p, i, i, i, i, i, f, i]
    dll.mlsk_attn_decode.restype = ctypes.c_int
    dll.mlsk_decode_layer.argtypes = [p, p, p, i, p, p, p, i, p, p, i, p]
    dll.mlsk_decode_layer.restype = ctypes.c_int
    got = dll.mlsk_variant().decode()
    if got != variant:  # e.g. a compiler that ignored -mavx512vnni
        return None, f"the {variant} build reports {got}"
    return Library(variant, path, dll), msg


@cache
def cpu_features() -> frozenset[str]:
    """CPU features that the CPU has and the OS enables (empty without kernels or off x86)."""
    if os.environ.get("MLSYSKIT_KERNELS", "1") == "0":
        return frozenset()
    lib, _ = _load("generic")
    if lib is None:
        return frozenset()
    bits = lib.dll.mlsk_cpu_features()
    return frozenset(name for name, bit in FEATURE_BITS.items() if bits >> bit & 1)


def runnable_variants() -> list[str]:
    """The variants this CPU (and OS) can run, best first."""
    have = cpu_features()
    return [name for name, _, need in VARIANTS if (X86 or name == "generic") and set(need) <= have]


@cache
def library(variant: str | None = None) -> tuple[Library | None, str]:
    """The kernels to use: ``(Library, how it was chosen)`` or ``(None, why not)``.

    ``variant=None`` takes ``$MLSYSKIT_KERNEL_VARIANT`` if set, else the best this CPU runs.
    """
    if os.environ.get("MLSYSKIT_KERNELS", "1") == "0":
        return None, "disabled by MLSYSKIT_KERNELS=0"
    if _compiler() is None:
        return None, "no C compiler (cc/gcc) found"
    runnable = runnable_variants()
    if not runnable:
        return None, _build("generic")[1]
    wanted = variant or os.environ.get("MLSYSKIT_KERNEL_VARIANT") or None
    if wanted is not None and wanted not in runnable:
        names = [v for v, _, _ in VARIANTS]
        why = "unknown" if wanted not in names else "not supported by this CPU"
        return None, f"kernel variant {wanted!r} is {why} (this CPU runs: {', '.join(runnable)})"
    reasons = []
    for name in [wanted] if wanted else runnable:
        lib, msg = _load(name)
        if lib is not None:
            return lib, f"{name} ({msg})"
        reasons.append(msg)
    return None, "; ".join(reasons)


def _lib(lib: Library | None) -> Library:
    if lib is not None:
        return lib
    chosen, why = library()
    if chosen is None:
        raise RuntimeError(f"mlsyskit kernels are not available: {why}")
    return chosen


def available() -> bool:
    """Whether the compiled kernels can be used on this machine."""
    return library()[0] is not None


def status() -> str:
    """Which variant is in use, or why the kernels are not, in a few words."""
    return library()[1]


def variant() -> str | None:
    """The variant in use (``"avx512vnni"``, ``"avx2"``, ...), None without kernels."""
    lib = library()[0]
    return None if lib is None else lib.variant


_warned: set[str] = set()


def warn_unavailable(consequence: str) -> None:
    """Say once per process (on stderr) that the kernels are off and what that costs."""
    if consequence in _warned:
        return
    _warned.add(consequence)
    print(f"mlsyskit: compiled kernels unavailable ({status()}): {consequence}", file=sys.stderr)


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX): prefill GEMMs in bf16."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_features())


def supports(in_features: int, group_size: int) -> bool:
    """Whether a weight of this shape/grouping has a kernel (else: dequantize + matmul)."""
    return (
        available()
        and in_features % BLOCK == 0
        and group_size % BLOCK == 0
        and in_features % group_size == 0
    )


# -- weights as the kernels see them ----------------------------------------------------------


def _ptr(a: Any) -> int:
    """Address of a tensor's or numpy array's first element (0 for None)."""
    if a is None:
        return 0
    if isinstance(a, Tensor):
        return a.data_ptr()
    return a.ctypes.data


@dataclass
class Part:
    """Rows of a weight in one format. ``data``: (rows, row_bytes) uint8 (tensor or numpy, e.g.
    a memory-mapped file); ``scale``/``zero``: (rows, groups) float32 for ``U4``/``I8``
    (``w = scale * (q - zero)``; zero None: 0); ``perm``: int32 output row of each stored row
    (None: in order)."""

    format: str
    data: Any
    scale: Tensor | None = None
    zero: Tensor | None = None
    perm: Tensor | None = None
    group_blocks: int = 0


class QWeight:
    """A (out_features, in_features) weight made of row-stacked :class:`Part` s, ready for the
    kernels (the C descriptors are built once; the arrays are kept alive here)."""

    def __init__(self, parts: Sequence[Part], in_features: int) -> None:
        if in_features % BLOCK:
            raise ValueError(f"in_features {in_features} is not a multiple of {BLOCK}")
        if not 1 <= len(parts) <= 16:
            raise ValueError("a weight has 1 to 16 parts")
        self.parts = list(parts)
        self.in_features = in_features
        nb = in_features // BLOCK
        self._c = (_Part * len(parts))()
        col = 0
        for c, p in zip(self._c, self.parts, strict=True):
            rows, row_bytes = p.data.shape
            if row_bytes != nb * BLOCK_BYTES[p.format]:
                raise ValueError(f"{p.format} rows of {in_features} values take {nb * BLOCK_BYTES[p.format]} bytes, not {row_bytes}")
            if p.format in ("U4", "I8"):
                if not p.group_blocks or nb % p.group_blocks or p.scale is None:
                    raise ValueError("U4/I8 parts need a scale per group of group_blocks blocks")
                for t in (p.scale, p.zero):
                    if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.shape != (rows, nb // p.group_blocks)):
                        raise ValueError("scale/zero must be contiguous float32 (rows, groups)")
            if p.perm is not None and (p.perm.dtype != torch.int32 or p.perm.shape != (rows,)):
                raise ValueError("perm must be int32 (rows,)")
            c.data, c.row_bytes = _ptr(p.data), row_bytes
            c.scale, c.zero, c.perm = _ptr(p.scale), _ptr(p.zero), _ptr(p.perm)
            c.format, c.rows, c.col0, c.group_blocks = FORMATS[p.format], rows, col, p.group_blocks
            col += rows
        self.out_features = col
        self.shape = (col, in_features)

    @property
    def address(self) -> int:
        """Where the C descriptors (``qpart_t[]``) are."""
        return ctypes.addressof(self._c)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks, scales, zeros and permutations (memory-mapped ones included)."""
        total = 0
        for p in self.parts:
            for a in (p.data, p.scale, p.zero, p.perm):
                if a is not None:
                    total += a.nbytes
        return total


_thread_override: list[int] = []  # innermost using_threads() value


@contextmanager
def using_threads(n: int) -> Iterator[None]:
    """Kernels called inside use ``n`` threads (default: ``torch.get_num_threads()``).
    Results do not depend on it: each output row (attention head) is one thread's work."""
    _thread_override.append(max(1, int(n)))
    try:
        yield
    finally:
        _thread_override.pop()


def _threads(threads: int | None) -> int:
    if threads:
        return threads
    return _thread_override[-1] if _thread_override else torch.get_num_threads()


def qmatmul(x: Tensor, w: QWeight, *, out: Tensor | None = None, lib: Library | None = None,
            threads: int | None = None) -> Tensor:
    """``x`` (M, K) float32 (rows may be strided) times ``w`` transposed: (M, N) float32
    (written into ``out`` when given: contiguous float32 (M, N))."""
    L = _lib(lib)
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        x = x.float().contiguous()
    M, K = x.shape
    if K != w.in_features:
        raise ValueError(f"x has {K} columns, the weight {w.in_features}")
    y = torch.empty(M, w.out_features, dtype=torch.float32) if out is None else out
    if M and L.dll.mlsk_qmatmul(x.data_ptr(), x.stride(0), M, K, w.address, len(w.parts),
                                y.data_ptr(), w.out_features, _threads(threads)):
        raise MemoryError("no memory for the quantized activations")
    return y


def dequantize(w: QWeight, dtype: torch.dtype = torch.float32, *, out: Tensor | None = None,
               lib: Library | None = None, threads: int | None = None) -> Tensor:
    """The dense (N, K) weight in float32 or bfloat16 (into ``out`` when given, e.g. a buffer
    reused across calls: a fresh allocation of tens of MB costs page faults every time)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("dequantize to float32 or bfloat16")
    if out is None:
        out = torch.empty(w.shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != w.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {w.shape}")
    _lib(lib).dll.mlsk_dequantize(w.address, len(w.parts), w.in_features, out.data_ptr(),
                                  int(dtype == torch.bfloat16), _threads(threads))
    return out


def gather_rows(w: QWeight, ids: Tensor, *, lib: Library | None = None) -> Tensor:
    """Rows ``ids`` of a one-part weight (an embedding table), dequantized: (len(ids), K)."""
    if len(w.parts) != 1 or w.parts[0].perm is not None:
        raise ValueError("gather_rows takes a weight of one part, rows in order")
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.out_features):
        raise IndexError(f"row index out of range (0..{w.out_features - 1})")
    out = torch.empty(ids.numel(), w.in_features, dtype=torch.float32)
    _lib(lib).dll.mlsk_gather_rows(w.address, ids.data_ptr(), ids.numel(), w.in_features, out.data_ptr())
    return out


def attn_decode(q: Tensor, k: Tensor, v: Tensor, slots: Tensor, k_pool: Tensor, v_pool: Tensor,
                tables: Tensor, lens: Tensor, scale: float, *, lib: Library | None = None,
                threads: int | None = None) -> Tensor:
    """Decode attention over the paged cache, in place.

    ``q`` (B, H, D), ``k``/``v`` (B, Hkv, D): the new token of each sequence (each may be a view
    with a row stride; the last two dimensions contiguous); ``slots`` (B,) int64 where the new
    k/v go (written first); pools (num_blocks, block_size, Hkv, D) float32 or float16, contiguous;
    ``tables`` (B, max_blocks) int32, ``lens`` (B,) int32 context lengths incl. the new token.
    Returns (B, H, D) float32.
    """
    B, H, D = q.shape
    Hkv = k.shape[1]
    for t in (q, k, v):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != D:
            raise ValueError("q, k, v must be float32 with contiguous heads")
    if k_pool.dtype not in (torch.float32, torch.float16) or v_pool.dtype != k_pool.dtype:
        raise ValueError("the KV pools must both be float32 or both float16")
    out = torch.empty(B, H, D, dtype=torch.float32)
    rc = _lib(lib).dll.mlsk_attn_decode(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        slots.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), int(k_pool.dtype == torch.float16),
        tables.data_ptr(), tables.shape[1],
        lens.data_ptr(), out.data_ptr(), B, H, Hkv, D, k_pool.shape[1], scale, _threads(threads),
    )
    if rc:
        raise MemoryError("no memory for the attention scores")
    return out


def fake_quantize_activations(x: Tensor) -> Tensor:
    """What the integer kernels multiply with instead of ``x`` (..., K): each block of 32 values
    rounded to int8 with its own scale ``d = max|x| / 127`` and dequantized, in the float32
    operations of ``csrc/qmatmul.c`` (so a reference built on it matches the kernels to
    float32 rounding of the sums)."""
    xb = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    return (torch.round(xb * inv) * d).reshape(x.shape)


DECODE_PHASES = ("qkv", "attention", "o_proj", "gate_up", "down", "other")


def decode_layer(layer: DecodeLayer, dims: DecodeDims, x: Tensor, pos: Tensor, slots: Tensor,
                 tables: Tensor, lens: Tensor, scratch: Tensor, *, stats: Any = None,
                 lib: Library | None = None, threads: int | None = None) -> None:
    """One Llama-family layer for B decoding sequences, ``x`` (B, dim) float32 updated in place
    (csrc/decode.c). ``pos`` (B,) int32 positions, ``slots`` (B,) int64, ``tables`` (B, max_blocks)
    and ``lens`` (B,) int32 as for :func:`attn_decode`; ``scratch``: float32 with at least
    B * (2 dim + (H + 2 Hkv) D + H D + 3 hidden) elements. ``stats``: None, or a ctypes array of
    6 doubles the seconds of each of :data:`DECODE_PHASES` are added to (profiling)."""
    rc = _lib(lib).dll.mlsk_decode_layer(
        ctypes.addressof(layer), ctypes.addressof(dims), x.data_ptr(), x.shape[0], pos.data_ptr(),
        slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(), scratch.data_ptr(),
        _threads(threads), None if stats is None else ctypes.addressof(stats),
    )
    if rc:
        raise MemoryError("the fused decode layer failed (out of memory)")


# -- the int4 layout of QuantLinear -----------------------------------------------------------


def pack_q4_blocks(codes: Tensor) -> Tensor:
    """Codes 0..15 (N, K) → (N, K/2) uint8: in each 32-wide block, byte j holds element j (low
    nibble) and element j + 16 (high nibble), GGUF's Q4 layout, so one kernel serves both."""
    N, K = codes.shape
    c = codes.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_q4_blocks(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_q4_blocks`: (N, K/2) uint8 → (N, K) uint8 codes."""
    N, half = packed.shape
    p = packed.view(N, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack((p & 0x0F, p >> 4), dim=2).reshape(N, 2 * half)
