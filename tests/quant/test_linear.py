"""QuantLinear computes ``x W^T + b`` with ``W = dequantize(codes)`` on every path (the integer
kernels with the activations rounded to int8 per block of 32, as llama.cpp does), and
``quantize_`` / ``attach_quantized`` install it in real models."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.transformer import RowEmbedding, build_transformer
from mlsyskit.models.vision import CNN, MLP
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import (
    DENSE_ROWS,
    QuantLinear,
    WeightOnlyConfig,
    attach_quantized,
    int4_weight_only,
    int8_weight_only,
    parse_quantization,
    quantize_,
)
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import quantize_tensor

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.status()}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer_and_reference(scheme: QuantScheme, out: int = 48, inf: int = 128, bias: bool = True):
    w = torch.randn(out, inf, generator=_gen(0))
    b = torch.randn(out, generator=_gen(1)) if bias else None
    qt = quantize_tensor(w, scheme)
    w_deq = qt.dequantize()

    def ref(x: torch.Tensor) -> torch.Tensor:
        y = x @ w_deq.T
        return y + b if b is not None else y

    return QuantLinear(qt, b), ref


KERNEL_CASES = [
    ("q8", QuantScheme(bits=8)),
    ("q8", QuantScheme(bits=8, granularity="group", group_size=32)),
    ("q8", QuantScheme(bits=8, granularity="tensor")),
    ("q8", QuantScheme(bits=8, symmetric=False)),  # zero point: the kernel, then s z sum(x)
    ("q8", QuantScheme(bits=8, granularity="group", group_size=64, symmetric=False)),
    ("q4", QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False)),
    ("q4", QuantScheme(bits=4, granularity="group", group_size=64)),
    ("q4", QuantScheme(bits=4, granularity="channel", symmetric=False)),
    ("q4", QuantScheme(bits=4, granularity="tensor")),
    # 3- and 2-bit codes fit in a nibble: they run on the 4-bit kernel
    ("q4", QuantScheme(bits=3, granularity="group", group_size=32, symmetric=False)),
    ("q4", QuantScheme(bits=3, granularity="channel")),
    ("q4", QuantScheme(bits=2, granularity="group", group_size=64, symmetric=False)),
]


@needs_kernels
@pytest.mark.parametrize("kind, scheme", KERNEL_CASES, ids=lambda c: str(c) if isinstance(c, str) else None)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_kernel_output_equals_dequantize_then_matmul(kind: str, scheme: QuantScheme, rows: int) -> None:
    layer, ref = layer_and_reference(scheme)
    assert layer.kind == kind
    x = torch.randn(rows, 128, generator=_gen(2))
    # The kernel multiplies int8 activations (rounded per block of 32) with the integer codes
    # and sums in another order: equal to the float reference on those activations up to
    # float32 rounding, relative to the size of the products summed.
    xq = kernels.fake_quantize_activations(x)
    scale = float((xq.abs() @ layer.weight().abs().T).max())
    torch.testing.assert_close(layer(x), ref(xq), rtol=0, atol=2e-6 * scale)
    # and the rounding of the activations costs well under 1 % of that scale
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-2 * scale)
    # from DENSE_ROWS rows on (prefill): dequantize, then one float32 matmul, exactly
    x = torch.randn(2, DENSE_ROWS // 2 + 1, 128, generator=_gen(3))
    assert torch.equal(layer(x), ref(x))


ROW_CASES = [KERNEL_CASES[i][1] for i in (0, 3, 4, 5, -3)] + [
    QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False, zero_point="float", double_quant=True),
    QuantScheme(bits=4, granularity="group", group_size=16, symmetric=False),  # no kernel
]


@pytest.mark.parametrize("scheme", ROW_CASES,
                         ids=lambda s: f"int{s.bits}-{s.granularity}-{s.group_size}-{'sym' if s.symmetric else 'asym'}")
def test_rows_are_the_dequantized_rows(scheme: QuantScheme) -> None:
    # an embedding lookup on a quantized table: the kernels' gather (or the PyTorch fallback
    # for group 16) gives exactly the rows of the weight the layer computes with, which is the
    # dequantized tensor (float zero points: s q + m computed as s (q - z), to float rounding)
    layer, _ = layer_and_reference(scheme)
    ids = torch.tensor([5, 0, 47, 5, 12])
    assert torch.equal(layer.rows(ids), layer.weight()[ids])
    want = quantize_tensor(torch.randn(48, 128, generator=_gen(0)), scheme).dequantize()[ids]
    torch.testing.assert_close(layer.rows(ids), want, rtol=0, atol=1e-6)


FALLBACK_CASES = [
    QuantScheme(bits=3, granularity="group", group_size=16, symmetric=False),  # group < 32
    QuantScheme(bits=4, granularity="group", group_size=16, symmetric=False),  # group < 32
]


@pytest.mark.parametrize("scheme", FALLBACK_CASES, ids=lambda s: f"int{s.bits}-{s.granularity}-{s.group_size}-{'sym' if s.symmetric else 'asym'}")
def test_dequant_fallback_is_exactly_dequantize_then_matmul(scheme: QuantScheme) -> None:
    layer, ref = layer_and_reference(scheme)
    assert layer.kind == "dequant"
    for x in (torch.randn(1, 128, generator=_gen(4)), torch.randn(3, 7, 128, generator=_gen(5))):
        assert torch.equal(layer(x), ref(x))
    assert torch.equal(layer.weight(), quantize_tensor(torch.randn(48, 128, generator=_gen(0)), scheme).dequantize())


def test_widths_the_kernels_cannot_take_fall_back() -> None:
    layer, ref = layer_and_reference(QuantScheme(bits=8), inf=48)  # 48 is not a multiple of 32
    assert layer.kind == "dequant"
    x = torch.randn(2, 48, generator=_gen(6))
    assert torch.equal(layer(x), ref(x))


def test_kernels_off_by_environment_use_the_fallback() -> None:
    code = """
import torch
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import QuantLinear
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import quantize_tensor
assert not kernels.available() and "MLSYSKIT_KERNELS=0" in kernels.status()
w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
for s in (QuantScheme(bits=8), QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False)):
    qt = quantize_tensor(w, s)
    layer = QuantLinear(qt)
    assert layer.kind == "dequant", layer.kind
    assert torch.equal(layer(x), x @ qt.dequantize().T)
print("ok")
"""
    env = {**os.environ, "MLSYSKIT_KERNELS": "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_nbytes_counts_only_codes_and_scales() -> None:
    int4, _ = layer_and_reference(QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False), bias=False)
    if int4.kind == "q4":  # two codes per byte, fp32 scale and zero per group of 32
        assert int4.nbytes == 48 * 128 // 2 + 2 * 4 * 48 * 4
    int8, _ = layer_and_reference(QuantScheme(bits=8), bias=True)
    assert int8.nbytes == 48 * 128 + 4 * 48 + 4 * 48  # codes, one scale per row, the bias


def fake_quantized_copy(model: nn.Module, config: WeightOnlyConfig) -> nn.Module:
    """The float model with each linear weight replaced by its dequantized codes."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(quantize_tensor(m.weight, config.scheme_for(m.in_features)).dequantize())
    return ref


@pytest.mark.parametrize("model_cls", [CNN, MLP])
@pytest.mark.parametrize("config", [int8_weight_only(), int4_weight_only()], ids=["int8", "int4"])
def test_quantize_fl_image_models(model_cls: type, config: WeightOnlyConfig) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    ref = fake_quantized_copy(model, config)
    convs = [m.weight.clone() for m in model.modules() if isinstance(m, nn.Conv2d)]
    quantize_(model, config)
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.equal(a, b) for a, b in zip(after, convs, strict=True))  # convs stay float
    x = torch.randn(4, 1, 28, 28, generator=_gen(7))
    with torch.no_grad():  # 4 rows: the integer kernels, activations rounded to int8 (~0.5 %)
        out, want = model(x), ref(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0.02 * float(want.abs().max()))
    if model_cls is CNN and config.scheme.bits == 4:  # fc1 takes 3136 = 64 * 49 inputs: 128 -> 64
        assert model.fc1.scheme.group_size == 64 and model.fc2.scheme.group_size == 128


def tiny_transformer(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    cfg = TransformerConfig(arch="llama", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            hidden_dim=128, max_seq_len=64, tie_embeddings=tied, attn_bias=True)
    model = build_transformer(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.qkv.bias.normal_()
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("spec", ["int8", "int4-g32", "int3-g32"])
def test_quantize_transformer(tied: bool, spec: str) -> None:
    model = tiny_transformer(tied)
    config = parse_quantization(spec)
    ref = fake_quantized_copy(model, config)
    if tied:  # the quantized table is the head and the lookup (rows dequantized)
        with torch.no_grad():
            ref.embed.weight.copy_(quantize_tensor(model.embed.weight, config.scheme).dequantize())
    quantize_(model, config)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1 and not any(type(m) is nn.Linear for m in model.modules())
    if tied:
        assert isinstance(model.embed, RowEmbedding) and model.embed.layer is model.lm_head
        assert not any(isinstance(m, nn.Embedding) for m in model.modules())
    else:
        assert isinstance(model.embed, nn.Embedding)
    with torch.no_grad():
        # 5 tokens: the integer kernels (activations rounded to int8 per block, ~0.5 %)
        out, want = model(torch.arange(5).unsqueeze(0)), ref(torch.arange(5).unsqueeze(0))
        torch.testing.assert_close(out, want, rtol=0, atol=0.02 * float(want.abs().max()))
        # DENSE_ROWS tokens and more (prefill): dequantized weights, float32 matmuls
        ids = torch.arange(DENSE_ROWS + 8).reshape(1, -1) % 96
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)


def test_attach_quantized_installs_weights_and_keeps_biases() -> None:
    model = tiny_transformer(tied=True)
    scheme = QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False)
    qkv = model.layers[0].attn.qkv
    bias = qkv.bias.detach().clone()
    weights = {
        "layers.0.attn.qkv.weight": quantize_tensor(qkv.weight, scheme),
        "lm_head.weight": quantize_tensor(model.embed.weight, scheme),
    }
    attach_quantized(model, weights)
    layer = model.layers[0].attn.qkv
    assert isinstance(layer, QuantLinear) and torch.equal(layer.bias, bias)
    assert torch.equal(layer.weight(), weights["layers.0.attn.qkv.weight"].dequantize())
    assert isinstance(model.lm_head, QuantLinear)  # a tied model gets a quantized head
    assert isinstance(model.layers[1].attn.qkv, nn.Linear) and type(model.layers[1].attn.qkv) is nn.Linear
    with pytest.raises(UserError, match="shape"):
        attach_quantized(model, {"layers.1.attn.o_proj.weight": quantize_tensor(torch.randn(64, 32), scheme)})
    with pytest.raises(UserError, match="linear layer"):
        attach_quantized(model, {"layers.1.attn_norm.weight": quantize_tensor(torch.randn(64, 64), scheme)})


def test_llama_cpp_activation_rounding() -> None:
    """Q8_K (K-quant weights): per 256, steps of 1 / (-127 / signed max), codes up to 127;
    Q8_0 (the 32-block formats): per 32, steps of max|x| / 127 rounded to float16."""
    from mlsyskit.quant.llama_cpp_peer import round_activations

    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    x[0, 5], x[1, 300] = -40.0, 9.0
    k = round_activations(x, "Q4_K").view(2, 2, 256)
    d = 1 / (-127 / torch.gather(x.view(2, 2, 256), 2, x.view(2, 2, 256).abs().argmax(2, keepdim=True)))
    q = k / d
    assert torch.allclose(q, q.round(), atol=1e-3) and q.max() <= 127.001 and q.min() >= -127.001
    assert (k - x.view(2, 2, 256)).abs().le(d.abs() / 2 + 1e-5).all()
    assert k[0, 0, 5] == pytest.approx(-40.0) and q[0, 0, 5].round() == -127
    b = round_activations(x, "Q5_0").view(2, 16, 32)
    step = (x.view(2, 16, 32).abs().amax(2, keepdim=True) / 127).half().float()
    assert torch.allclose(b / step, (b / step).round(), atol=1e-3)
    assert (b - x.view(2, 16, 32)).abs().le(0.6 * step).all()  # half a step, and d rounded to float16
    assert not torch.equal(b, k.view(2, 16, 32))  # two different roundings
