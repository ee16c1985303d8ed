"""Bit packing: exact round trips for every width and length, byte layouts by hand, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsyskit.quant.packing import pack, packed_nbytes, unpack


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from([8, 4, 3, 2]))
    values = draw(st.lists(st.integers(0, 2**bits - 1), max_size=75))
    return torch.tensor(values, dtype=torch.int64), bits


@settings(max_examples=150, deadline=None)
@given(codes_and_bits(), st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]))
def test_round_trip_exact(cb, dtype):
    codes, bits = cb
    packed = pack(codes.to(dtype), bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == -(-codes.numel() * bits // 8)
    out = unpack(packed, bits, codes.numel())
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), codes)


def test_layouts_by_hand():
    assert pack(torch.tensor([5, 255, 0], dtype=torch.uint8), 8).tolist() == [5, 255, 0]
    # 4 bits: the first code in the low nibble; an odd tail leaves the high nibble 0
    assert pack(torch.tensor([0x1, 0x2, 0xF]), 4).tolist() == [0x21, 0x0F]
    # 2 bits: four per byte, first code in the lowest bits
    assert pack(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b11]
    # 3 bits: eight codes in three bytes (a 24-bit little-endian word)
    codes = [7, 0, 0, 0, 0, 0, 0, 1]
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert pack(torch.tensor(codes), 3).tolist() == [word & 255, (word >> 8) & 255, word >> 16]
    # a 3-bit tail takes only the bytes it needs: 9 codes -> 27 bits -> 4 bytes
    assert pack(torch.full((9,), 7), 3).tolist() == [255, 255, 255, 7]


def test_2d_codes_are_read_row_major():
    codes = torch.arange(12).view(3, 4) % 8
    assert torch.equal(unpack(pack(codes, 3), 3, 12).long(), codes.reshape(-1))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_out_of_range_codes_are_refused(bits):
    with pytest.raises(ValueError, match=rf"{bits}-bit codes must lie in \[0, {2**bits - 1}\]"):
        pack(torch.tensor([0, 2**bits]), bits)
    with pytest.raises(ValueError, match="must lie in"):
        pack(torch.tensor([-1, 0], dtype=torch.int8), bits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="integer"):
        pack(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="5-bit"):
        pack(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="take 2 bytes, got 3"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(2, dtype=torch.int8), 4, 4)
