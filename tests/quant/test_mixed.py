"""Mixed precision by sensitivity: measured per-layer errors, the greedy choice under a budget."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mlsyskit.errors import UserError
from mlsyskit.quant.diagnostics import layer_error_report
from mlsyskit.quant.linear import WeightOnlyConfig, parse_quantization, quantize_
from mlsyskit.quant.mixed import candidate_schemes, choose_schemes, layer_errors
from mlsyskit.quant.model_io import load_checkpoint, quantize_checkpoint
from mlsyskit.quant.scheme import QuantScheme

from .test_diagnostics import sample, tiny_model

LOW = QuantScheme(bits=3, granularity="group", group_size=32, symmetric=False)


def test_layer_errors_are_the_error_reports_per_layer_rows() -> None:
    # the errors mixed precision chooses from are the rel_output_error rows of the per-layer
    # error report of a round-to-nearest model, at every candidate width
    model = tiny_model()
    ids = sample(model, 6, 24, seed=1)
    config = WeightOnlyConfig(LOW, include_lm_head=False)
    cands = candidate_schemes(LOW)
    assert [s.bits for s in cands] == [3, 4, 8]
    errors = layer_errors(model, ids, config, cands)
    assert set(errors) == {f"layers.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.o_proj", "ffn.gate_up", "ffn.down")}
    for level, s in enumerate(cands):
        q = quantize_(copy.deepcopy(model), WeightOnlyConfig(s, include_lm_head=False))
        rows = {r["name"]: r["rel_output_error"] for r in layer_error_report(model, q, ids) if r["kind"] == "linear"}
        for name, errs in errors.items():
            assert errs[level] == pytest.approx(rows[name], rel=1e-3, abs=1e-6)
    for errs in errors.values():  # more bits, less error
        assert errs[0] > errs[1] > errs[2]


def test_choose_schemes_spends_the_budget_where_error_drops_most_per_bit() -> None:
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    errors = {"a": [0.2, 0.1, 0.01], "b": [0.4, 0.2, 0.02], "c": [0.3, 0.15, 0.015]}
    cands = candidate_schemes(LOW)
    low_bpw = LOW.bits_per_weight(64, 64)  # 3 + 19/32
    # the cheapest mix fits exactly: nothing is raised
    plan = choose_schemes(shapes, errors, cands, low_bpw, config=WeightOnlyConfig(LOW))
    assert plan.widths() == {"a": 3, "b": 3, "c": 3}
    assert plan.bits_per_weight == pytest.approx(low_bpw)
    # room for one 64x64 layer at 4 bits (of 4 x 64 x 64 weights): b, whose error drops most
    one = low_bpw + (cands[1].bits_per_weight(64, 64) - low_bpw) / 4
    plan = choose_schemes(shapes, errors, cands, one + 1e-9, config=WeightOnlyConfig(LOW))
    assert plan.widths() == {"a": 3, "b": 4, "c": 3} and plan.bits_per_weight <= one + 1e-9
    # an unlimited budget: everything at 8 bits
    plan = choose_schemes(shapes, errors, cands, 32.0, config=WeightOnlyConfig(LOW))
    assert set(plan.widths().values()) == {8}
    # fixed weights (a head) count in the budget
    with pytest.raises(UserError, match="below the cheapest mix"):
        choose_schemes(shapes, errors, cands, low_bpw, fixed_weights=64 * 64, fixed_bits=8 * 64 * 64)


def test_quantize_checkpoint_with_a_budget(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = parse_quantization("int3-g32")
    base = quantize_checkpoint(tiny_llama_dir, tmp_path / "all3", config, lm_head="int8")
    budget = base["bits_per_weight"] + 0.05  # the head is most of this tiny model's weights
    summary = quantize_checkpoint(tiny_llama_dir, tmp_path / "mixed", config, lm_head="int8", budget=budget,
                                  calib_windows=4, calib_window_len=32)
    assert base["bits_per_weight"] < summary["bits_per_weight"] <= budget
    assert summary["mixed"]["planned_bits_per_weight"] == pytest.approx(summary["bits_per_weight"], abs=1e-6)
    assert summary["label"].endswith(f"-mixed{budget:g}")
    sd = load_checkpoint(tmp_path / "mixed").state_dict
    bits = {k: v.scheme.bits for k, v in sd.items() if k.startswith("layers.") and hasattr(v, "scheme")}
    assert max(bits.values()) > 3  # layers raised above --bits within the budget
    assert summary["mixed"]["layers_by_bits"] == {str(b): list(bits.values()).count(b) for b in sorted(set(bits.values()))}
    assert set(bits.values()) <= {3, 4, 8}
