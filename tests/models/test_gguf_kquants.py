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


# -- the same blocks repacked for the compiled kernels (mlsyskit.quant.gguf_repack) -----------


def _kernel_variants() -> list[str]:
    from mlsyskit.quant import kernels

    return kernels.runnable_variants() if kernels.available() else []


@pytest.mark.parametrize("variant", _kernel_variants())
@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_repacked_blocks_dequantize_and_multiply_like_gguf_py(name: str, variant: str) -> None:
    """Exact formats agree with gguf-py to float32 rounding (Q5_0 bit for bit); re-quantized
    blocks (Q6_K, Q2_K, Q3_K's rare overflow) within half their int8 step; the integer kernel
    computes with the repacked values. Blocks with a zero scale (constant blocks) included."""
    import torch

    from mlsyskit.quant import gguf_repack, kernels

    from ..quant.test_kernels import reference

    lib = kernels.library(variant)[0]
    block, nbytes = GGML_QUANT_SIZES[Q[name]]
    rows = 6
    raw = random_blocks(name, rows * 512 // block, seed=len(name)).reshape(rows, -1)
    raw[1, F16_FIELDS[name][0] : F16_FIELDS[name][0] + 2] = 0  # d = 0: a block (or super-block) of constants
    ref = gguf_dequantize(raw, Q[name]).reshape(rows, 512)
    r = gguf_repack.repack(name, raw)
    qw = kernels.QWeight([r.part], 512)
    ours = kernels.dequantize(qw, lib=lib).numpy()
    step = r.part.scale.numpy().repeat(32, axis=1)  # each value's block scale
    err = np.abs(ours - ref)
    if name in ("Q6_K", "Q2_K"):
        assert r.requantized_blocks > 0
    if name == "Q5_0":
        assert np.array_equal(ours, ref)
    lossy = err > 1e-6 * np.abs(ref).max()
    assert r.requantized_blocks or not lossy.any()
    assert (err <= 0.5001 * np.abs(step) + 1e-6 * np.abs(ref).max()).all()
    for m in (3, 9):  # one-row tiles, and rows in SIMD lanes (from 8 rows on)
        x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, 512)).astype(np.float32))
        want, size = reference(x, ours.astype(np.float64))
        np.testing.assert_allclose(kernels.qmatmul(x, qw, lib=lib).numpy(), want, rtol=0, atol=2e-6 * size)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M"])
def test_llama_cpp_k_quants_run_natively_like_the_float_path(wide_f32_gguf: Path, tmp_path: Path, ftype: str) -> None:
    """A llama.cpp-written K-quant model on the kernels (repacked blocks, int8 activations)
    against the same file dequantized to float32: the logits agree as for Q4_0/Q4_1/Q8_0."""
    pytest.importorskip("llama_cpp")  # `make bench-deps` builds it; CI's `make test` does not
    import torch
    import torch.nn.functional as F

    from mlsyskit.engine import LLM, SamplingParams
    from mlsyskit.quant import kernels
    from mlsyskit.quant.linear import BlockLinear, set_prefill_dtype
    from mlsyskit.quant.llama_cpp_peer import quantize

    if not kernels.available():
        pytest.skip(f"no compiled kernels: {kernels.status()}")
    path = quantize(wide_f32_gguf, tmp_path / f"{ftype}.gguf", ftype)
    native, ref = LLM(path, max_model_len=64), LLM(path, dtype="float32", max_model_len=64)
    model = native.engine.model
    formats = {f for m in model.modules() if isinstance(m, BlockLinear) for f in m.formats}
    assert f"Q{ftype[1]}_K" in formats, formats
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # no float weight left
    ids = torch.tensor([native.tokenizer.encode("To be, or not to be, that is the question:")[:40]])
    with torch.no_grad():
        want = ref.engine.model(ids)[0]
        set_prefill_dtype(model, torch.float32)
        dense = model(ids)[0]  # 40 rows: dense GEMMs on the repacked weights
        small = model(ids[:, :5])[0]  # 5 rows: the integer kernels
    # every mix holds Q6_K (the tied table / head at least), re-quantized to int8 per 32
    assert sum(m.requantized_blocks for m in model.modules() if isinstance(m, BlockLinear)) > 0
    assert F.cosine_similarity(dense, want, dim=-1).min() > 0.999
    assert F.cosine_similarity(small, want[:5], dim=-1).min() > 0.99
    out = native.generate(["Once upon a time"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert native.engine.runner.fused is not None and len(out.token_ids) == 4


def test_tensor_parallel_column_split_of_k_quant_blocks() -> None:
    """A row-parallel split on a 256-value super-block boundary keeps the blocks; one inside a
    super-block gives the float32 columns (both equal to the whole weight's columns)."""
    import torch

    from mlsyskit.engine.parallel import _take_cols
    from mlsyskit.models.gguf_loader import BlockTensor, BlockWeight

    raw = random_blocks("Q4_K", 8).reshape(4, -1)  # 4 rows of 512 values
    w = BlockWeight((BlockTensor("Q4_K", raw),), (4, 512))
    whole = w.dequantize()
    kept = _take_cols(w, 256, 512)
    assert isinstance(kept, BlockWeight) and torch.equal(kept.dequantize(), whole[:, 256:])
    cut = _take_cols(w, 128, 384)
    assert isinstance(cut, torch.Tensor) and torch.equal(cut, whole[:, 128:384])
