"""llama.cpp's 5-bit and K-quant blocks repacked at load for the compiled kernels.

The kernels (:mod:`mlsyskit.quant.kernels`) compute on GGUF's Q4_0 / Q4_1 / Q8_0 blocks as the
file stores them, and on int4 (``U4``) / int8 (``I8``) codes with a float32 scale and zero point
per 32-element block (``w = scale * (q - zero)``). A tensor in another GGUF block format becomes
one of those (one scale per block, ``group_blocks=1``; codes from
:mod:`mlsyskit.models.gguf_kquants`):

- **Q5_0** -> I8: codes ``q - 16``, scale ``d``: the same float32 values as gguf-py's, bit for bit.
- **Q5_1** -> I8: codes ``q`` (0..31), scale ``d``, zero ``-m / d``.
- **Q4_K** -> U4, **Q5_K** -> I8: each sub-block of 32 is a block: codes ``q``, scale
  ``d * sc``, zero ``dmin * m / (d * sc)``.

  For these and Q5_1 the values agree with gguf-py's to float32 rounding of
  ``scale * (q - zero)`` (a few ulp). A block whose scale is 0 holds the constant ``c``
  (``m``, or ``-dmin * m``): codes 0, scale ``c``, zero -1 or 1 (exact).
- **Q6_K**, **Q3_K** (sub-blocks of 16: two scales per 32): the integer products ``sc * q`` with
  scale ``d``, exact (to float32 rounding) where they fit in int8; else **re-quantized** to
  int8 per 32 (scale ``d * max|sc q| / 127``, each value off by at most half that scale). For
  Q3_K the products always fit but for ``q = -4, sc = -32`` (128); for Q6_K (``|sc q|`` up to
  4064) most blocks are re-quantized: 8 bits per 32 instead of 6 bits per 16 with an 8-bit scale.
- **Q2_K** (two minimums per 32): re-quantized from its values to int8 per 32 with a zero point
  (each value off by at most half of ``(max - min) / 255``).

Re-quantized blocks are counted (:attr:`Repacked.requantized_blocks`); the float path
(``dtype="float32"``, ``MLSYSKIT_KERNELS=0``) dequantizes the file's blocks exactly instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mlsyskit.models import gguf_kquants as kq
from mlsyskit.models.gguf_loader import dequantize_into
from mlsyskit.quant import kernels

BLOCK = kernels.BLOCK
REPACKED = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # GGUF formats this module takes


@dataclass
class Repacked:
    """A GGUF tensor as the kernels take it, and how many of its 32-blocks were re-quantized
    (0: the same values as the file's)."""

    part: kernels.Part
    requantized_blocks: int


def _tensor(a: np.ndarray, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(rows, -1))


def _constant_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, const: np.ndarray,
                     where: np.ndarray) -> None:
    """Blocks ``where`` (scale 0) hold the constant ``const``: codes 0, scale |c|, zero -+1,
    so that ``scale * (0 - zero)`` is ``c`` exactly. Arrays are (blocks, ...) views."""
    codes[where] = 0
    scale[where] = np.abs(const[where])
    zero[where] = -np.sign(const[where])


def _affine(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``scale * q + offset`` as ``scale * (q - zero)``: (codes, zero), scale updated
    in place where a block's scale is 0. ``codes`` (blocks, 32); scale/offset (blocks,) float32."""
    zero = np.zeros_like(scale)
    live = scale != 0
    np.divide(-offset, scale, out=zero, where=live)
    _constant_blocks(codes, scale, zero, offset, ~live)
    return codes, zero


def _products(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sub-blocks of 16 with int scales ``sc`` (n, 16) and codes ``q`` (n, 256) under one ``d``
    (n, 1): int8 codes per 32 (the products sc * q where they fit, else re-quantized) and the
    scale of each 32-block; returns (codes (n*8, 32) int8, scale (n*8,), re-quantized count)."""
    n = len(q)
    p = (q.reshape(n, 16, 16).astype(np.int16) * sc.reshape(n, 16, 1).astype(np.int16)).reshape(n * 8, 32)
    amax = np.abs(p).max(axis=1)
    fits = amax <= 127
    step = np.where(fits, 1.0, amax / np.float32(127)).astype(np.float32)  # d units per code
    codes = np.where(fits[:, None], p, np.clip(np.rint(p / step[:, None]), -127, 127)).astype(np.int8)
    scale = (np.repeat(d.reshape(n), 8) * step).astype(np.float32)
    return codes, scale, int((~fits).sum())


def _requantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Float blocks (blocks, 32) to int8 with a scale and zero point each: (codes, scale, zero,
    blocks re-quantized)."""
    lo, hi = values.min(axis=1), values.max(axis=1)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    live = scale > 0
    zero = np.zeros_like(scale)
    np.subtract(-128, lo / np.where(live, scale, 1), out=zero, where=live)
    codes = np.clip(np.rint(values / np.where(live, scale, 1)[:, None] + zero[:, None]), -128, 127).astype(np.int8)
    _constant_blocks(codes, scale, zero, lo, ~live)
    return codes, scale, zero, int(live.sum())


def repack(qtype: str, data: np.ndarray, perm: torch.Tensor | None = None) -> Repacked:
    """The rows ``data`` ((rows, row_bytes) uint8, e.g. a memory-mapped GGUF tensor) of a
    tensor in block format ``qtype`` (one of :data:`REPACKED`) as a U4/I8 kernel part."""
    if qtype not in REPACKED:
        raise ValueError(f"{qtype} blocks are not repacked (the kernels take Q4_0/Q4_1/Q8_0 as they are)")
    values_per, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(-1, nbytes)
    k = data.shape[1] // nbytes * values_per
    n = len(blocks)
    lossy = 0
    zero: np.ndarray | None = None
    fmt = "I8"
    if qtype in ("Q5_0", "Q5_1"):
        q = kq.q5_codes(blocks, 2 if qtype == "Q5_0" else 4).astype(np.int8)
        scale = kq.f16(blocks[:, :2]).reshape(n)
        if qtype == "Q5_0":
            codes = q - np.int8(16)
        else:
            codes, zero = _affine(q, scale, kq.f16(blocks[:, 2:4]).reshape(n))
    elif qtype in ("Q4_K", "Q5_K"):
        q = kq.q4_k_codes(blocks) if qtype == "Q4_K" else kq.q5_k_codes(blocks)
        d, dmin, sc, m = kq.scale_min_k4(blocks)
        scale = (d * sc.astype(np.float32)).reshape(n * 8)
        codes, zero = _affine(q.reshape(n * 8, 32), scale, -(dmin * m.astype(np.float32)).reshape(n * 8))
        fmt = "U4" if qtype == "Q4_K" else "I8"
    elif qtype in ("Q6_K", "Q3_K"):
        codes, scale, lossy = _products(*(kq.q6_k_codes(blocks) if qtype == "Q6_K" else kq.q3_k_codes(blocks)))
    else:  # Q2_K
        values = np.empty((rows, k), dtype=np.float32)
        dequantize_into(blocks.reshape(-1), int(GGMLQuantizationType[qtype]), values)
        codes, scale, zero, lossy = _requantize(values.reshape(-1, BLOCK))
    codes = torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, k))
    packed = kernels.pack_q4_blocks(codes) if fmt == "U4" else codes.view(torch.uint8)
    part = kernels.Part(fmt, packed, _tensor(scale, rows), None if zero is None else _tensor(zero, rows),
                        perm=perm, group_blocks=1)
    return Repacked(part, lossy)
