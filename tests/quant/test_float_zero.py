"""Float zero points (w ~ S q + m, as Q4_1) and double-quantized scales (as the K-quants)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.quant.gptq import gptq_quantize, hessian, layer_objective
from mlsyskit.quant.linear import QuantLinear
from mlsyskit.quant.model_io import quantized_tensor_of
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.storage import load_quantized, save_quantized
from mlsyskit.quant.tensor import quantize_tensor

FLOAT = QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False, zero_point="float")
KQUANT = QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False, zero_point="float", double_quant=True)
INT = QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False)


@pytest.fixture(scope="module")
def real_weight(smollm2_path: Path) -> torch.Tensor:
    from gguf.quants import dequantize

    from mlsyskit.models.gguf_loader import GGUFFile

    t = next(t for t in GGUFFile(smollm2_path).tensors if t.name == "blk.5.ffn_down.weight")
    return torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(576, 1536)[:128]


def test_bits_per_weight() -> None:
    assert FLOAT.bits_per_weight(64, 256) == 4 + 32 / 32  # fp16 scale + fp16 minimum per 32
    assert KQUANT.bits_per_weight(64, 256) == 4.5  # llama.cpp's Q4_K
    sym = QuantScheme(bits=3, granularity="group", group_size=16, double_quant=True, super_groups=16)
    assert sym.bits_per_weight(8, 256) == 3 + 6 / 16 + 16 / 256  # Q3_K's 3.4375
    assert KQUANT.bits_per_weight(1, 576) == 4 + 12 / 32 + 2 * 16 * 3 / 576  # 18 groups: 3 super-blocks


@pytest.mark.parametrize("kwargs, message", [
    ({"zero_point": "float"}, "asymmetric"),
    ({"zero_point": "half"}, "zero_point must be one of"),
    ({"double_quant": True, "granularity": "channel"}, "granularity 'group'"),
])
def test_bad_schemes(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        QuantScheme(bits=4, **kwargs)


@pytest.mark.parametrize("scheme", [FLOAT, KQUANT, QuantScheme(bits=3, granularity="group", group_size=64, double_quant=True)], ids=["float", "kquant", "sym-dq"])
def test_storage_round_trips_bit_exactly(scheme: QuantScheme, real_weight: torch.Tensor, tmp_path: Path) -> None:
    qt = quantize_tensor(real_weight, scheme, clip_ratio=0.9)
    save_quantized(tmp_path, {"w": qt}, {})
    back = load_quantized(tmp_path)[0]["w"]
    for field in ("codes", "scale", "zero", "minimum"):
        a, b = getattr(qt, field), getattr(back, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert torch.equal(back.dequantize(), qt.dequantize())
    # the file holds what the bits say (6-bit codes packed), up to the safetensors header
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size - scheme.bits_per_weight(*real_weight.shape) * real_weight.numel() / 8 < 2048


def test_not_double_quantized_values_are_refused(tmp_path: Path) -> None:
    qt = quantize_tensor(torch.randn(4, 64), KQUANT)
    qt.scale = qt.scale * 1.001
    with pytest.raises(UserError, match="not double-quantized"):
        save_quantized(tmp_path, {"w": qt}, {})


def test_float_zero_points_are_more_accurate(real_weight: torch.Tensor) -> None:
    def mse(s: QuantScheme) -> float:
        return float((quantize_tensor(real_weight, s).dequantize() - real_weight).square().mean())

    assert mse(FLOAT) < 0.9 * mse(INT)
    assert mse(KQUANT) < 1.1 * mse(INT)  # 4.5 bits against INT's 4.625


def test_quant_linear_keeps_the_minimums(real_weight: torch.Tensor) -> None:
    qt = quantize_tensor(real_weight, FLOAT)
    layer = QuantLinear(qt)
    back = quantized_tensor_of(layer)
    assert torch.equal(back.minimum, qt.minimum) and torch.equal(back.codes, qt.codes) and back.zero is None
    x = torch.randn(40, real_weight.shape[1])
    torch.testing.assert_close(layer(x), x @ qt.dequantize().T, rtol=1e-4, atol=1e-4)


def test_gptq_with_float_zero_points(real_weight: torch.Tensor) -> None:
    x = torch.randn(512, real_weight.shape[1]) * torch.linspace(0.2, 3, real_weight.shape[1])
    h = hessian(x)
    for scheme in (FLOAT, KQUANT):
        qt = gptq_quantize(real_weight, h, scheme)
        rtn = layer_objective(real_weight, quantize_tensor(real_weight, scheme).dequantize(), h)
        assert bool((layer_objective(real_weight, qt.dequantize(), h) <= rtn).all())
        assert qt.minimum is not None and qt.zero is None
