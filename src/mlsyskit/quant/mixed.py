"""Mixed precision by sensitivity: per-layer bit widths under a bits-per-weight budget.

llama.cpp's ``_M`` mixes give some tensors more bits than the rest (the output/embedding table,
``attn_v`` and half of the ``ffn_down`` tensors), by a fixed rule. Here the choice is measured:

1. :func:`layer_errors`: for every linear layer of the blocks and every candidate scheme, the
   relative output error ``||X (W_q - W)^T|| / ||X W^T||`` on the float model's own inputs of
   that layer (the calibration windows), i.e. the ``rel_output_error`` rows of
   :func:`mlsyskit.quant.diagnostics.layer_error_report` for a round-to-nearest model, computed
   block by block from the inputs' Gram root instead of a second model;
2. :func:`choose_schemes`: every layer starts at the cheapest candidate; greedily, the upgrade
   (one layer to its next candidate) with the largest drop of squared relative error per added
   bit is taken while the whole model, output projection included, stays within the budget.

The result is a per-layer override map for :class:`~mlsyskit.quant.linear.WeightOnlyConfig`
(``overrides``), which RTN, AWQ and GPTQ all follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant.awq import gram_root
from mlsyskit.quant.calibration import embed_inputs, recorded_inputs
from mlsyskit.quant.linear import WeightOnlyConfig
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import fake_quantize

BATCH = 8  # calibration windows per block forward


@dataclass
class MixedPlan:
    """The chosen scheme of every block linear (``schemes``), the bits per weight of the whole
    model it gives (``bits_per_weight``, the output projection included) and the per-layer
    relative errors at every candidate it was chosen from (``errors``)."""

    schemes: dict[str, QuantScheme]
    bits_per_weight: float
    errors: dict[str, list[float]]

    def widths(self) -> dict[str, int]:
        """Layer name -> bits of its codes."""
        return {n: s.bits for n, s in self.schemes.items()}


@torch.no_grad()
def layer_errors(
    model: Transformer, calib_ids: Tensor, config: WeightOnlyConfig, candidates: Sequence[QuantScheme]
) -> dict[str, list[float]]:
    """Relative output error of every linear layer of ``model``'s blocks (those ``config``
    selects) quantized round-to-nearest with each of ``candidates`` (group sizes fitted to the
    layer as ``config.scheme_for`` does), on the float inputs of the calibration windows
    ``calib_ids`` (windows, T). The model is not changed."""
    x, rope = embed_inputs(model, calib_ids)
    out: dict[str, list[float]] = {}
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        linears = {
            prefix + n: m
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and (config.filter is None or config.filter(prefix + n, m))
        }
        with recorded_inputs(linears) as rec:
            x = torch.cat([block(xb, rope) for xb in x.split(BATCH)])
        for name, lin in linears.items():
            r = gram_root(torch.cat(rec.pop(name)))
            w = lin.weight.detach().float()
            ref = (r @ w.T).square().sum().clamp(min=1e-30)
            out[name] = []
            for s in candidates:
                fitted = dataclasses.replace(config, scheme=s).scheme_for(w.shape[1])
                err = (r @ (fake_quantize(w, fitted) - w).T).square().sum()
                out[name].append(float((err / ref).sqrt()))
    return out


def choose_schemes(
    shapes: dict[str, tuple[int, int]],
    errors: dict[str, list[float]],
    candidates: Sequence[QuantScheme],
    budget: float,
    fixed_weights: int = 0,
    fixed_bits: float = 0.0,
    config: WeightOnlyConfig | None = None,
) -> MixedPlan:
    """Per-layer schemes under ``budget`` bits per weight (see the module docstring).

    ``shapes``: layer -> (out, in); ``errors``: layer -> relative error at each candidate (in
    the order of ``candidates``, cheapest first); ``fixed_weights`` / ``fixed_bits``: weights
    and bits outside the choice (the output projection) that count in the budget. Raises
    UserError when even the cheapest candidates exceed the budget.
    """
    fit = config or WeightOnlyConfig(candidates[0])

    def bits(name: str, level: int) -> float:
        o, i = shapes[name]
        s = dataclasses.replace(fit, scheme=candidates[level]).scheme_for(i)
        return o * i * s.bits_per_weight(o, i)

    n = fixed_weights + sum(o * i for o, i in shapes.values())
    level = dict.fromkeys(shapes, 0)
    total = fixed_bits + sum(bits(k, 0) for k in shapes)
    if total > budget * n + 1e-6:
        raise UserError(
            f"a bits-per-weight budget of {budget} is below the cheapest mix ({total / n:.3f}); "
            "raise --budget or lower --bits"
        )
    while True:
        best, best_gain = None, 0.0
        for k, lv in level.items():
            if lv + 1 >= len(candidates):
                continue
            cost = bits(k, lv + 1) - bits(k, lv)
            if total + cost > budget * n + 1e-6:
                continue
            gain = (errors[k][lv] ** 2 - errors[k][lv + 1] ** 2) / max(cost, 1e-9)
            if gain > best_gain:
                best, best_gain = k, gain
        if best is None:
            break
        total += bits(best, level[best] + 1) - bits(best, level[best])
        level[best] += 1
    schemes = {
        k: dataclasses.replace(fit, scheme=candidates[lv]).scheme_for(shapes[k][1]) for k, lv in level.items()
    }
    return MixedPlan(schemes=schemes, bits_per_weight=total / n, errors=errors)


def candidate_schemes(low: QuantScheme) -> list[QuantScheme]:
    """The widths a layer may take, cheapest first: ``low``, ``low`` with one more bit (when
    that is at most 4), and 8 bits per output channel with a zero point."""
    out = [low]
    if low.bits < 4:
        out.append(dataclasses.replace(low, bits=low.bits + 1))
    if low.bits < 8:
        out.append(QuantScheme(bits=8, granularity="channel", symmetric=False, scale_dtype=low.scale_dtype))
    return out


def plan_mixed(
    model: Transformer,
    calib_ids: Tensor,
    config: WeightOnlyConfig,
    budget: float,
    head_scheme: QuantScheme | None,
) -> MixedPlan:
    """Measure (:func:`layer_errors`) and choose (:func:`choose_schemes`) per-layer schemes for
    ``model`` under ``budget`` bits per weight, counting the output projection (for a tied
    model the embedding table) at ``head_scheme`` (None: float32)."""
    if not isinstance(budget, (int, float)) or budget <= 0:
        raise UserError(f"the bits-per-weight budget must be positive, got {budget!r}")
    candidates = candidate_schemes(config.scheme)
    errors = layer_errors(model, calib_ids, config, candidates)
    linears = dict(model.named_modules())
    shapes = {k: (linears[k].out_features, linears[k].in_features) for k in errors}
    head = model._modules.get("lm_head")
    hw = model.embed.weight if head is None else head.weight
    o, i = hw.shape
    head_bits = 32.0 * o * i if head_scheme is None else o * i * head_scheme.bits_per_weight(o, i)
    return choose_schemes(shapes, errors, candidates, budget, o * i, head_bits, config)
