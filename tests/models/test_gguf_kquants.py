"""Q5_0/Q5_1 and K-quant dequantization against gguf-py's reference, and GGUF bit counting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from mlsyskit.models.gguf_kquants import DEQUANTIZERS
from mlsyskit.models.gguf_loader import GGUFFile, dequantize, linear_weight_bits

Q = GGMLQuantizationType
# byte offsets of each format's float16 scale fields (d, dmin / m)
F16_FIELDS = {"Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Blocks with every code, scale and mask bit random, and finite float16 scales."""
    rng = np.random.default_rng(seed)
    nbytes = GGML_QUANT_SIZES[Q[name]][1]
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        raw[:, off : off + 2] = rng.normal(0, 0.02, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def test_every_format_is_covered() -> None:
    assert sorted(DEQUANTIZERS) == sorted(F16_FIELDS)


@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_dequantize_is_bit_exact_against_gguf_py(name: str) -> None:
    block = GGML_QUANT_SIZES[Q[name]][0]
    raw = random_blocks(name, 96)
    shape = (12, 96 * block // 12)  # rows of several blocks each, as in a weight
    ours = dequantize(raw, Q[name], shape).numpy()
    ref = gguf_dequantize(raw.reshape(shape[0], -1), Q[name]).reshape(shape)
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0
    assert np.array_equal(ours, ref)


def test_wrong_byte_count_is_refused() -> None:
    from mlsyskit.errors import UserError

    raw = random_blocks("Q4_K", 2)
    with pytest.raises(UserError, match="does not fit"):
        dequantize(raw[:, :-1], Q.Q4_K, (1, 512))


def test_smollm2_bits_per_weight(smollm2_path: Path) -> None:
    # linear weights: Q4_1 (5 bits) blocks, and the tied Q8_0 embedding (8.5 bits) as the head
    n, bits = linear_weight_bits(smollm2_path)
    reader = GGUFFile(smollm2_path)
    kinds = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert kinds == {"Q4_1"} and embd.tensor_type == Q.Q8_0
    n_embd = int(np.prod(embd.shape))
    assert bits == pytest.approx((n - n_embd) * 5.0 + n_embd * 8.5)
    assert n == 134515008 - 30 * 2 * 576 - 576  # every parameter but the norm weights
