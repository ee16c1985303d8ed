"""Dequantization of llama.cpp's 5-bit and K-quant block formats (numpy, vectorised).

Q5_0 / Q5_1: blocks of 32 values, a 5th bit per value in a 32-bit mask. K-quants (Q2_K ..
Q6_K): super-blocks of 256 values in 16 or 8 sub-blocks, whose scales (and minimums) are small
integers multiplied by one or two float16 super-block scales ``d`` / ``dmin``. Layouts as in
ggml-common.h; each function writes the float32 values of ``blocks`` (n, bytes per block)
into ``o`` (n, values per block) with the same float32 operations in the same order as
``gguf.quants`` (so the results are bit-identical), and no temporary larger than the codes.
The ``*_codes`` functions give the integer codes and scales themselves, which
:mod:`mlsyskit.quant.gguf_repack` repacks into the layouts of the compiled kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK_K = 256


def f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) little-endian float16 bytes -> (n, 1) float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _shifts(*s: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.array(s, dtype=np.uint8).reshape(shape)


_NIBBLES = _shifts(0, 4, shape=(1, 2, 1))
_CRUMBS = _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))
_BITS = _shifts(*range(8), shape=(1, 1, 8, 1))


def q5_codes(blocks: np.ndarray, off: int) -> np.ndarray:
    """The 5-bit codes 0..31 of Q5_0 (``off`` = 2) / Q5_1 (``off`` = 4) blocks: (n, 32) uint8."""
    n = len(blocks)
    # byte j: element j in its low nibble, element j + 16 in its high one; bit i of the mask
    # (little-endian u32) is element i's fifth bit
    high = np.unpackbits(blocks[:, off : off + 4], axis=1, bitorder="little")
    low = (blocks[:, off + 4 :].reshape(n, 1, 16) >> _NIBBLES) & 0x0F
    return low.reshape(n, 32) | (high << 4)


def q5_0(blocks: np.ndarray, o: np.ndarray) -> None:
    """value = d * (q - 16)"""
    o[:] = q5_codes(blocks, 2)
    o -= 16
    o *= f16(blocks[:, :2])


def q5_1(blocks: np.ndarray, o: np.ndarray) -> None:
    """value = d * q + m"""
    o[:] = q5_codes(blocks, 4)
    o *= f16(blocks[:, :2])
    o += f16(blocks[:, 2:4])


def q2_k(blocks: np.ndarray, o: np.ndarray) -> None:
    """16 sub-blocks of 16: value = d * (sc & 15) * q - dmin * (sc >> 4); q 2 bits."""
    n = len(blocks)
    sc, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = f16(blocks[:, 80:82]), f16(blocks[:, 82:84])
    o.reshape(n, 2, 4, 32)[:] = (qs.reshape(n, 2, 1, 32) >> _CRUMBS) & 3
    v = o.reshape(n, 16, 16)
    v *= (d * (sc & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    v -= (dmin * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)


def q3_k_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (n, 256) int8 in [-4, 3], scales (n, 16) int8 in [-32, 31], d (n, 1) float32)."""
    n = len(blocks)
    hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    lo = (sc[:, :8].reshape(n, 1, 8) >> _NIBBLES) & 0x0F
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, shape=(1, 4, 1))) & 0x03
    scales = (lo.reshape(n, 16) | (hi.reshape(n, 16) << 4)).astype(np.int8) - np.int8(32)
    q = ((qs.reshape(n, 2, 1, 32) >> _CRUMBS) & 3).astype(np.int8)
    q -= ((((hmask.reshape(n, 1, 1, 32) >> _BITS) & 1) ^ 1).reshape(n, 2, 4, 32) << 2).astype(np.int8)
    return q.reshape(n, 256), scales, f16(blocks[:, 108:110])


def q3_k(blocks: np.ndarray, o: np.ndarray) -> None:
    """16 sub-blocks of 16: value = d * (sc - 32) * q, q in [-4, 3] (2 low bits + a high-bit
    mask whose *cleared* bit subtracts 4); 6-bit scales packed in 12 bytes."""
    n = len(blocks)
    q, scales, d = q3_k_codes(blocks)
    o[:] = q
    o.reshape(n, 16, 16)[:] *= (d * scales.astype(np.float32)).reshape(n, 16, 1)


def scale_min_k4(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d, dmin (n, 1) float32, the 8 six-bit scales and minimums (n, 8) uint8) of Q4_K/Q5_K
    super-blocks: sub-block i's values are d * sc[i] * q - dmin * m[i]."""
    n = len(blocks)
    s = blocks[:, 4:16].reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return f16(blocks[:, :2]), f16(blocks[:, 2:4]), scale, mins


def _apply_k4(blocks: np.ndarray, o: np.ndarray) -> None:
    """``o`` (codes) -> d * sc * q - dmin * m per sub-block of 32 (Q4_K, Q5_K)."""
    n = len(blocks)
    d, dmin, sc, m = scale_min_k4(blocks)
    v = o.reshape(n, 8, 32)
    v *= (d * sc.astype(np.float32)).reshape(n, 8, 1)
    v -= (dmin * m.astype(np.float32)).reshape(n, 8, 1)


def q4_k_codes(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) uint8 codes 0..15: 32 bytes hold 64 values (low nibbles first)."""
    n = len(blocks)
    return ((blocks[:, 16:].reshape(n, 4, 1, 32) >> _NIBBLES) & 0x0F).reshape(n, 256)


def q4_k(blocks: np.ndarray, o: np.ndarray) -> None:
    """8 sub-blocks of 32, 4-bit codes."""
    o[:] = q4_k_codes(blocks)
    _apply_k4(blocks, o)


def q5_k_codes(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) uint8 codes 0..31: Q4_K's plus a fifth bit per value, bit j of byte l of the
    mask being value 32 j + l's."""
    n = len(blocks)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    low = (qs.reshape(n, 4, 1, 32) >> _NIBBLES) & 0x0F
    high = (qh.reshape(n, 1, 1, 32) >> _BITS) & 1
    return (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).reshape(n, 256)


def q5_k(blocks: np.ndarray, o: np.ndarray) -> None:
    """8 sub-blocks of 32, 5-bit codes."""
    o[:] = q5_k_codes(blocks)
    _apply_k4(blocks, o)


def q6_k_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (n, 256) int8 in [-32, 31], scales (n, 16) int8, d (n, 1) float32)."""
    n = len(blocks)
    ql, qh, sc = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    low = (ql.reshape(n, 2, 1, 64) >> _NIBBLES) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> _CRUMBS) & 0x03
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    return q.reshape(n, 256), sc.view(np.int8), f16(blocks[:, 208:210])


def q6_k(blocks: np.ndarray, o: np.ndarray) -> None:
    """16 sub-blocks of 16: value = d * sc * (q - 32), sc int8, q 4 low + 2 high bits."""
    n = len(blocks)
    q, sc, d = q6_k_codes(blocks)
    o[:] = q
    o.reshape(n, 16, 16)[:] *= (d * sc.astype(np.float32)).reshape(n, 16, 1)


# GGMLQuantizationType name -> dequantizer
DEQUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "Q5_0": q5_0,
    "Q5_1": q5_1,
    "Q2_K": q2_k,
    "Q3_K": q3_k,
    "Q4_K": q4_k,
    "Q5_K": q5_k,
    "Q6_K": q6_k,
}
