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


@pytest.fixture(scope="module")
def wide_f32_gguf(tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint) -> Path:
    """A random 1-layer llama 256 wide (K-quants need rows of 256) with SmolLM2's vocabulary,
    written as an F32 GGUF."""
    import torch

    from mlsyskit.models.config import TransformerConfig
    from mlsyskit.models.gguf_export import write_gguf
    from mlsyskit.models.transformer import build_transformer

    cfg = TransformerConfig(arch="llama", vocab_size=smollm2_checkpoint.config.vocab_size, dim=256, n_layers=1,
                            n_heads=4, n_kv_heads=2, hidden_dim=512, max_seq_len=128, tie_embeddings=True)
    torch.manual_seed(0)
    model = build_transformer(cfg)
    sd = {k: v + 0.02 * torch.randn_like(v) if v.dim() == 1 else v for k, v in model.state_dict().items()}
    return write_gguf(tmp_path_factory.mktemp("wide") / "f32.gguf", cfg, sd, smollm2_checkpoint.tokenizer)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q5_0", "Q5_1"])
def test_llama_cpp_blocks_dequantize_exactly(wide_f32_gguf: Path, tmp_path: Path, ftype: str) -> None:
    pytest.importorskip("llama_cpp")  # `make bench-deps` builds it; CI's `make test` does not
    from mlsyskit.models.checkpoint import load_checkpoint
    from mlsyskit.quant.llama_cpp_peer import quantize

    path = quantize(wide_f32_gguf, tmp_path / f"{ftype}.gguf", ftype)
    reader = GGUFFile(path)
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert ftype.split("_")[0] + "_" + ftype.split("_")[1] in kinds  # e.g. Q4_K blocks were written
    for t in reader.tensors:
        shape = tuple(reversed(t.shape))
        ours = dequantize(t.data, t.tensor_type, shape).numpy()
        assert np.array_equal(ours, gguf_dequantize(t.data, t.tensor_type).reshape(shape)), t.name
    ckpt = load_checkpoint(path)  # loads whole, and the K-quant weight is close to the float one
    ref = load_checkpoint(wide_f32_gguf).state_dict["layers.0.ffn.down.weight"]
    err = (ckpt.state_dict["layers.0.ffn.down.weight"] - ref).norm() / ref.norm()
    assert 0 < err < 0.5
