"""GPTQ against a direct implementation of its update, and against RTN on the layer objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsyskit.models.checkpoint import load_checkpoint
from mlsyskit.models.transformer import build_transformer
from mlsyskit.quant.gptq import gptq_, gptq_quantize, hessian, layer_objective
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import quantize_tensor


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, damp: float, act_order: bool) -> torch.Tensor:
    """The paper's update written out directly, in float64: quantize column i, move its error onto
    the free columns with the explicit inverse Hessian, remove i from that inverse (a rank-one
    downdate), next column. No Cholesky factor, no lazy blocks. Returns the codes."""
    out, cols = w.shape
    gs = scheme.group_size if scheme.granularity == "group" else cols
    W = w.double().clone()
    H = h.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    order = torch.argsort(h.diagonal(), descending=True).tolist() if act_order else list(range(cols))
    one = QuantScheme(scheme.bits, "channel", scheme.group_size, scheme.symmetric, scheme.scale_dtype)

    def params(cols_w: torch.Tensor):
        qt = quantize_tensor(cols_w.float(), one)
        return qt.scale.double()[:, 0], None if qt.zero is None else qt.zero.double()[:, 0]

    static = {g: params(W[:, g : g + gs]) for g in range(0, cols, gs)} if act_order else {}
    hinv = torch.linalg.inv(H)
    free = list(range(cols))
    codes = torch.zeros(out, cols, dtype=torch.float64)
    current = {}
    for c in order:
        g = c - c % gs
        if act_order:
            s, z = static[g]
        else:
            if c == g:
                current[g] = params(W[:, g : g + gs])
            s, z = current[g]
        q = torch.round(W[:, c] / s) + (0 if z is None else z)
        q = q.clamp(scheme.qmin, scheme.qmax)
        codes[:, c] = q
        deq = s * (q - (0 if z is None else z))
        err = (W[:, c] - deq) / hinv[c, c]
        W[:, free] -= err.unsqueeze(1) * hinv[c, free].unsqueeze(0)
        free.remove(c)
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]
    return codes


def _layer(seed: int, out: int = 24, cols: int = 64, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    # correlated inputs with a few loud channels, like a transformer's
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x[:, :4] *= 8
    return w, hessian(x)


@pytest.mark.parametrize(
    "scheme, act_order",
    [
        (QuantScheme(bits=4, granularity="group", group_size=16, symmetric=False), False),
        (QuantScheme(bits=3, granularity="group", group_size=32), False),
        (QuantScheme(bits=4, granularity="channel", symmetric=False), False),
        (QuantScheme(bits=4, granularity="group", group_size=16, symmetric=False), True),
    ],
)
def test_equals_the_direct_update(scheme: QuantScheme, act_order: bool) -> None:
    w, h = _layer(0)
    ours = gptq_quantize(w, h, scheme, act_order=act_order, dtype=torch.float64, block=24, fallback=False)
    ref = reference_gptq(w, h, scheme, 0.01, act_order)
    assert torch.equal(ours.codes.double(), ref)
    # and it is not RTN: the compensation moved codes
    assert not torch.equal(ours.codes, quantize_tensor(w, ours.scheme).codes)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits, act_order", [(4, False), (3, True), (2, False)])
def test_never_worse_than_rtn_on_the_layer_objective(seed: int, bits: int, act_order: bool) -> None:
    w, h = _layer(seed)
    scheme = QuantScheme(bits=bits, granularity="group", group_size=32, symmetric=False)
    rtn = layer_objective(w, quantize_tensor(w, scheme).dequantize(), h)
    gptq = layer_objective(w, gptq_quantize(w, h, scheme, act_order=act_order).dequantize(), h)
    assert bool((gptq <= rtn).all())
    assert gptq.sum() < 0.8 * rtn.sum()  # and clearly better in total


def test_gptq_on_a_model_beats_rtn(tiny_llama_dir: Path, sample_text_file: Path) -> None:
    from mlsyskit.quant.calibration import calibration_windows
    from mlsyskit.quant.linear import quantize_
    from mlsyskit.quant.perplexity import perplexity

    ckpt = load_checkpoint(tiny_llama_dir)
    text = sample_text_file.read_text()
    ids = calibration_windows(ckpt.tokenizer, text, n_windows=8, window=64)
    config = WeightOnlyConfig(QuantScheme(bits=3, granularity="group", group_size=32, symmetric=False))
    model = build_transformer(ckpt.config, ckpt.state_dict)
    result = gptq_(model, ids, config)
    assert all(isinstance(m, QuantLinear) for m in (model.layers[0].attn.qkv, model.layers[1].ffn.down, model.lm_head))
    assert all(result.errors_gptq[k] <= result.errors_rtn[k] for k in result.errors_rtn)
    assert sum(result.errors_gptq.values()) < 0.9 * sum(result.errors_rtn.values())
    rtn = quantize_(build_transformer(ckpt.config, ckpt.state_dict), config)
    held = torch.tensor(ckpt.tokenizer.encode(text[-4000:]))[:300]
    assert perplexity(model, held, window=100).nll < perplexity(rtn, held, window=100).nll


@pytest.mark.parametrize("method, act_order", [("gptq", True), ("awq-gptq", False)])
def test_quantize_checkpoint_with_gptq(tiny_llama_dir: Path, sample_text_file: Path, tmp_path: Path, method: str, act_order: bool) -> None:
    from mlsyskit.quant.model_io import quantize_checkpoint

    config = WeightOnlyConfig(QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False))
    summary = quantize_checkpoint(tiny_llama_dir, tmp_path / "q", config, method=method, act_order=act_order,
                                  calib_text=sample_text_file.read_text(), calib_windows=4, calib_window_len=64)
    assert summary["label"] == f"int4-g32-asym-{method}"  # written, reloaded bit-exactly (checked inside)
    assert summary["calibration"]["windows"] == 4
