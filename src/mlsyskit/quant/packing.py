"""Bit packing of unsigned integer codes into a dense little-endian bit stream of bytes.

Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the stream, least significant bit first, so:

- 8 bits: one code per byte;
- 4 bits: two codes per byte, the first in the low nibble;
- 2 bits: four codes per byte, the first in the lowest two bits;
- 3 bits: eight codes in three bytes (24 bits), the first in the lowest three bits;
- 6 bits: four codes in three bytes (double-quantized scales).

A packed tensor has exactly ``packed_nbytes(numel, bits) = ceil(numel * bits / 8)`` bytes;
the unused high bits of the last byte are zero. Codes must already be unsigned
(``[0, 2^bits)``): signed codes are offset by ``2^(bits-1)`` by the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PACK_BITS = (8, 6, 4, 3, 2)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``pack`` produces for ``numel`` codes of ``bits`` bits."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"can pack {list(PACK_BITS)}-bit codes, not {bits}-bit")


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte chunk: (1, 1), (4, 3), (2, 1), (8, 3), (4, 1)."""
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2^bits)`` (any shape, read flattened) into a 1-D uint8 tensor.

    Raises ValueError for unsupported ``bits``, a non-integer tensor or an out-of-range code.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"{bits}-bit codes must lie in [0, {2**bits - 1}], "
            f"got [{int(flat.min())}, {int(flat.max())}]"
        )
    if bits == 8:
        return flat.to(torch.uint8).clone()
    n_codes, n_bytes = _chunk(bits)
    pad = -n % n_codes
    c = torch.nn.functional.pad(flat.to(torch.int32), (0, pad)).view(-1, n_codes)
    word = c[:, 0].clone()  # at most 24 bits, fits int32
    for i in range(1, n_codes):
        word |= c[:, i] << (bits * i)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(n_bytes)], dim=1)
    return out.reshape(-1)[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The ``numel`` codes of a ``pack`` output, as a 1-D uint8 tensor (exact inverse).

    Raises ValueError unless ``packed`` is uint8 with exactly ``packed_nbytes(numel, bits)``
    elements.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if numel < 0 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"{numel} {bits}-bit codes take {packed_nbytes(max(numel, 0), bits)} bytes, "
            f"got {packed.numel()}"
        )
    flat = packed.detach().reshape(-1)
    if bits == 8:
        return flat.clone()
    n_codes, n_bytes = _chunk(bits)
    b = torch.nn.functional.pad(flat.to(torch.int32), (0, -flat.numel() % n_bytes))
    b = b.view(-1, n_bytes)
    word = b[:, 0].clone()
    for j in range(1, n_bytes):
        word |= b[:, j] << (8 * j)
    mask = 2**bits - 1
    out = torch.stack([(word >> (bits * i)) & mask for i in range(n_codes)], dim=1)
    return out.reshape(-1)[:numel].to(torch.uint8)
