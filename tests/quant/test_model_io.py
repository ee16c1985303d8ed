"""Quantized model directories: bit-exact reload through the engine's loader, sizes by hand."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from mlsyskit.engine import LLM, SamplingParams
from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import load_checkpoint
from mlsyskit.models.transformer import build_transformer
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig, parse_quantization, quantize_
from mlsyskit.quant.model_io import (
    load_model_dir,
    model_tensors,
    quantize_checkpoint,
    quantized_tensor_of,
    save_model_dir,
)
from mlsyskit.quant.packing import packed_nbytes
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import QuantizedTensor, quantize_tensor

SPECS = {
    "int8": parse_quantization("int8"),
    "int4-g32": parse_quantization("int4-g32"),
    "int4-sym": WeightOnlyConfig(QuantScheme(bits=4, granularity="group", group_size=32)),
    "int3-g32": parse_quantization("int3-g32"),
    "int2-tensor": WeightOnlyConfig(QuantScheme(bits=2, granularity="tensor", symmetric=False)),
}


def quantized_model(folder: Path, config: WeightOnlyConfig):
    ckpt = load_checkpoint(folder)
    return ckpt, quantize_(build_transformer(ckpt.config, ckpt.state_dict), config)


@pytest.mark.parametrize("scheme", [
    QuantScheme(bits=8), QuantScheme(bits=8, granularity="tensor"),
    QuantScheme(bits=8, symmetric=False), QuantScheme(bits=8, granularity="group", group_size=32, symmetric=False),
    QuantScheme(bits=4, granularity="group", group_size=32),
    QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False),
    QuantScheme(bits=4, granularity="tensor", symmetric=False),
    QuantScheme(bits=3, granularity="group", group_size=16, symmetric=False),
])
def test_quantized_tensor_of_undoes_the_kernel_layouts(scheme: QuantScheme) -> None:
    qt = quantize_tensor(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)), scheme)
    back = quantized_tensor_of(QuantLinear(qt))
    assert torch.equal(back.codes, qt.codes) and back.codes.dtype == qt.codes.dtype
    assert torch.equal(back.scale, qt.scale)
    assert (back.zero is None) == (qt.zero is None)
    if qt.zero is not None:
        assert torch.equal(back.zero, qt.zero)


@pytest.mark.parametrize("spec", list(SPECS))
def test_save_load_is_bit_exact(spec: str, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    # Qwen2: q/k/v biases and tied embeddings (the quantized head is a copy of the embedding).
    ckpt, model = quantized_model(tiny_qwen2_dir, SPECS[spec])
    out = save_model_dir(model, ckpt.tokenizer, tmp_path / "q", {"label": spec})
    again = load_checkpoint(out)  # the engine's loader dispatches on quant_config.json
    assert again.file_type == spec
    saved = model_tensors(model)
    assert set(again.state_dict) == set(saved)
    for name, t in saved.items():
        got = again.state_dict[name]
        if isinstance(t, QuantizedTensor):
            assert isinstance(got, QuantizedTensor) and got.scheme == t.scheme
            assert torch.equal(got.codes, t.codes) and torch.equal(got.scale, t.scale)
            assert (got.zero is None) == (t.zero is None)
            assert got.zero is None or torch.equal(got.zero, t.zero)
        else:
            assert torch.equal(got, t), name
    reloaded = build_transformer(again.config, again.state_dict, quantized_linear=QuantLinear)
    for ids in (torch.arange(5).unsqueeze(0), torch.arange(20, 60).unsqueeze(0)):  # kernel and prefill paths
        assert torch.equal(reloaded(ids), model(ids))
    kinds = {m.kind for m in reloaded.modules() if isinstance(m, QuantLinear)}
    assert kinds == {m.kind for m in model.modules() if isinstance(m, QuantLinear)}
    assert again.tokenizer.encode("Hello there") == ckpt.tokenizer.encode("Hello there")
    assert again.tokenizer.chat_template == ckpt.tokenizer.chat_template
    assert again.tokenizer.eos_ids == ckpt.tokenizer.eos_ids and again.tokenizer.bos_id == ckpt.tokenizer.bos_id


def test_file_size_and_bits_by_hand(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # int4, groups of 32, asymmetric: per weight 4 bits + per group a 16-bit scale and a 4-bit zero.
    config = parse_quantization("int4-g32")
    ckpt, model = quantized_model(tiny_llama_dir, config)
    out = save_model_dir(model, ckpt.tokenizer, tmp_path / "q", {})
    dim, hidden, vocab, layers = 64, 128, 49152, 2
    qkv = (4 + 2 * 2) * 16  # (heads + 2 kv heads) * head_dim rows
    shapes = [(qkv, dim), (dim, dim), (2 * hidden, dim), (dim, hidden)] * layers + [(vocab, dim)]
    data = 0
    for out_f, in_f in shapes:
        groups = out_f * in_f // 32
        data += packed_nbytes(out_f * in_f, 4) + 2 * groups + packed_nbytes(groups, 4)
    plain = vocab * dim + layers * 2 * dim + dim  # embedding, two norms per layer, final norm
    data += 4 * plain  # fp32
    weights = out / "model.safetensors"
    header = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    assert weights.stat().st_size == 8 + header + data
    # the 4-bit codes are half a byte each: the file is far below fp32's 4 bytes per linear weight
    n_linear = sum(o * i for o, i in shapes)
    assert data - 4 * plain == pytest.approx(n_linear * (4 + 20 / 32) / 8, abs=len(shapes))


def test_quantize_checkpoint_rtn_and_engine_generates(tiny_llama_dir: Path, tmp_path: Path) -> None:
    summary = quantize_checkpoint(tiny_llama_dir, tmp_path / "q", parse_quantization("int4-g64"))
    assert summary["label"] == "int4-g64-asym-rtn"
    assert summary["bits_per_weight"] == pytest.approx(4 + 20 / 64)  # 64 | every input width
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["method"] == "rtn" and meta["source"] == str(tiny_llama_dir)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    from_dir = LLM(tmp_path / "q").generate("Once upon a time", params)[0].token_ids
    on_load = LLM(tiny_llama_dir, quantization="int4-g64").generate("Once upon a time", params)[0].token_ids
    assert from_dir == on_load and len(from_dir) == 6  # same codes, same greedy tokens


def test_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ckpt, model = quantized_model(tiny_llama_dir, parse_quantization("int8"))
    out = save_model_dir(model, ckpt.tokenizer, tmp_path / "q", {})
    with pytest.raises(UserError, match="already exists"):
        save_model_dir(model, ckpt.tokenizer, out, {})
    save_model_dir(model, ckpt.tokenizer, out, {"label": "again"}, overwrite=True)
    assert load_model_dir(out).file_type == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary dirs left behind
    with pytest.raises(UserError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "q2", parse_quantization("int4"))
    exact = WeightOnlyConfig(QuantScheme(bits=4, granularity="group", group_size=48), fit_group_size=False)
    with pytest.raises(UserError, match="does not divide"):
        quantize_checkpoint(tiny_llama_dir, tmp_path / "q3", exact)
    assert not (tmp_path / "q3").exists()
    (out / "config.json").unlink()
    with pytest.raises(UserError, match="config.json is missing"):
        load_checkpoint(out)
    (out / "quant_config.json").write_text("{}")
    with pytest.raises(UserError, match="mlsyskit-quant"):
        load_checkpoint(out)


@pytest.mark.parametrize("folder, lm_head", [("tiny_qwen2_dir", "int8"), ("tiny_llama_dir", "int8"), ("tiny_llama_dir", "float")])
def test_lm_head_precision(folder: str, lm_head: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(folder)  # qwen2: tied embeddings; llama: its own lm_head
    summary = quantize_checkpoint(path, tmp_path / "q", parse_quantization("int4-g32"), lm_head=lm_head)
    assert summary["label"] == f"int4-g32-asym-rtn-head-{lm_head}"
    sd = load_checkpoint(tmp_path / "q").state_dict
    assert sd["layers.0.ffn.down.weight"].scheme.bits == 4
    tied = folder == "tiny_qwen2_dir"
    # tied: the quantized table is stored once, as the embedding, and serves as the head
    head = sd.get("embed.weight" if tied else "lm_head.weight")
    if lm_head == "float":
        assert isinstance(head, torch.Tensor)
    else:
        assert head.scheme == QuantScheme(bits=8, granularity="channel")
        assert tied == ("lm_head.weight" not in sd)
    n_body = 2 * (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128)
    n_head = 49152 * 64
    head_bits = 32 if lm_head == "float" else 8 + 16 / 64
    expected = (n_body * (4 + 20 / 32) + n_head * head_bits) / (n_body + n_head)
    assert summary["bits_per_weight"] == pytest.approx(expected, abs=1e-6)
