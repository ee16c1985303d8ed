"""The lab's diagnostics: salient vs random channels, per-layer error report, perplexity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.transformer import Transformer, build_transformer
from mlsyskit.quant.awq import awq_
from mlsyskit.quant.diagnostics import layer_error_report, perplexity_of, salient_channel_experiment
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig, quantize_
from mlsyskit.quant.scheme import QuantScheme


def tiny_model(seed: int = 0, tied: bool = False, outliers: bool = True) -> Transformer:
    """A 2-block Llama with sharp predictions (a scaled-up head) and, with ``outliers``, two
    input channels of every qkv and gate_up 30x larger than the rest."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        arch="llama",
        vocab_size=64,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        max_seq_len=64,
        tie_embeddings=tied,
    )
    model = build_transformer(cfg)
    with torch.no_grad():
        if not tied:
            model.lm_head.weight.mul_(4)
        if outliers:
            for block in model.layers:
                block.attn_norm.weight[:2] *= 30
                block.ffn_norm.weight[:2] *= 30
    return model


def sample(model: Transformer, n: int, t: int, seed: int) -> torch.Tensor:
    """Token windows drawn from the model itself: the float model fits them best, so any
    weight error raises their perplexity (by the KL divergence, on average)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (n, 1), generator=gen)
    with torch.no_grad():
        for _ in range(t - 1):
            p = model(ids)[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=gen)], 1)
    return ids


def scheme(bits: int) -> QuantScheme:
    return QuantScheme(bits=bits, granularity="group", group_size=32, symmetric=False)


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    model = tiny_model(outliers=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity_of(model, torch.randint(0, 64, (5, 9))) == pytest.approx(64, rel=1e-5)
    with pytest.raises(UserError, match="at least 2 tokens"):
        perplexity_of(model, torch.zeros(2, 1, dtype=torch.long))


def test_perplexity_of_is_the_mean_next_token_nll():
    model = tiny_model(outliers=False)
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        logp = model(ids).log_softmax(-1)[:, :-1]
    nll = -logp.gather(-1, ids[:, 1:, None]).mean().item()
    assert perplexity_of(model, ids, batch_size=2) == pytest.approx(math.exp(nll), rel=1e-5)


def test_salient_channels_matter_more_than_random_ones():
    model = tiny_model()
    calib, held_out = sample(model, 4, 32, seed=1), sample(model, 8, 32, seed=2)
    before = copy.deepcopy(model.state_dict())
    res = salient_channel_experiment(model, calib, held_out, scheme(3), fraction=1 / 32)
    assert set(res) == {"fp32", "rtn", "salient", "random", "fraction"}
    assert res["fp32"] < res["salient"] < res["random"]
    assert res["salient"] - res["fp32"] < 0.5 * (res["random"] - res["fp32"])
    assert res["rtn"] > res["fp32"]
    for name, t in model.state_dict().items():  # the model is given back unchanged
        assert torch.equal(t, before[name]), name


def test_layer_error_report_rows_and_growth_with_fewer_bits():
    model = tiny_model(outliers=False)
    ids = sample(model, 2, 24, seed=3)
    reports = {}
    for bits in (4, 3, 2):
        q = quantize_(copy.deepcopy(model), WeightOnlyConfig(scheme(bits)))
        reports[bits] = layer_error_report(model, q, ids)
    rows = reports[4]
    linears = [r for r in rows if r["kind"] == "linear"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(r["name"] for r in linears) == sorted(names)
    assert {r["name"]: r["depth"] for r in linears}["lm_head"] == 2
    assert {r["name"]: r["depth"] for r in linears}["layers.1.ffn.down"] == 1
    assert all(0 < r["rel_output_error"] < 1 for r in linears)
    resid = [r for r in rows if r["kind"] == "residual"]
    assert [r["name"] for r in resid] == ["layers.0", "layers.1"] and rows[-1]["kind"] == "logits"
    assert all(0 < r["rel_error"] < 1 for r in resid + rows[-1:])
    for fewer, more in ((3, 4), (2, 3)):
        for a, b in zip(reports[fewer], reports[more], strict=True):
            key = "rel_output_error" if a["kind"] == "linear" else "rel_error"
            assert a["name"] == b["name"] and a[key] > b[key], (fewer, a["name"])


def test_layer_error_report_on_a_tied_head_and_each_layers_own_error():
    model = tiny_model(tied=True, outliers=False)
    ids = sample(model, 2, 16, seed=4)
    q = quantize_(copy.deepcopy(model), WeightOnlyConfig(scheme(4)))
    rows = {r["name"]: r for r in layer_error_report(model, q, ids) if r["kind"] == "linear"}
    assert "lm_head" in rows and 0 < rows["lm_head"]["rel_output_error"] < 1
    # only QuantLinear layers get a row; blocks before the first one carry no error
    half = copy.deepcopy(model)
    half.layers[1].attn.o_proj = QuantLinear.from_linear(
        model.layers[1].attn.o_proj, QuantScheme(bits=8)
    )
    rows = layer_error_report(model, half, ids)
    assert [r["name"] for r in rows if r["kind"] == "linear"] == ["layers.1.attn.o_proj"]
    assert rows[0]["rel_error"] == 0.0  # block 0 untouched: no error yet


def test_layer_error_report_of_an_awq_model_needs_the_scaled_float_model():
    model = tiny_model()
    ids = sample(model, 2, 32, seed=5)
    scaled = copy.deepcopy(model)
    awq_(scaled, ids, WeightOnlyConfig(scheme(4)), quantize=False)
    q = copy.deepcopy(scaled)
    awq_(q, ids, WeightOnlyConfig(scheme(4)), grid=1)  # alpha 0 only: clip and quantize
    with pytest.raises(UserError, match="norm"):
        layer_error_report(model, q, ids)
    rows = layer_error_report(scaled, q, ids)
    assert all(0 < r.get("rel_output_error", r.get("rel_error")) < 1 for r in rows)
