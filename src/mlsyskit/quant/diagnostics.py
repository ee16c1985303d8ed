"""The AWQ lab's diagnostic experiments, as functions.

- :func:`salient_channel_experiment`: quantize every linear by RTN but keep 1% of its input
  channels in float, chosen by activation magnitude (salient) or at random; the paper's
  observation is that the salient 1% recovers most of the loss and a random 1% does not.
- :func:`layer_error_report`: relative output error of each quantized linear on the float
  model's own inputs, and of the residual stream after each block when the whole quantized
  model runs (how the error grows through the depth).
- :func:`perplexity_of`: perplexity over token windows (the full CLI lives elsewhere).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant.calibration import embed_inputs, input_abs_mean
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import fake_quantize

BATCH = 4  # windows per forward: a few windows' logits (T x vocab floats each) at a time


def perplexity_of(model: nn.Module, ids: Tensor, batch_size: int = BATCH) -> float:
    """``exp`` of the mean next-token negative log-likelihood over windows ``ids`` (n, T):
    each window is one forward from position 0 and scores its tokens 1..T-1."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise UserError("perplexity needs (windows, tokens) ids with at least 2 tokens per window")
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(batch_size):
            logits = model(batch)[:, :-1].float()
            target = batch[:, 1:]
            nll += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            ).item()
            count += target.numel()
    return math.exp(nll / count)


def salient_channel_experiment(
    model: Transformer,
    calib_ids: Tensor,
    eval_ids: Tensor,
    scheme: QuantScheme,
    fraction: float = 0.01,
    seed: int = 0,
) -> dict[str, float]:
    """Perplexity on ``eval_ids`` of the float model and of three fake-quantized versions:

    - ``"fp32"``: the model as given;
    - ``"rtn"``: every linear of every block round-to-nearest quantized with ``scheme``
      (its group size fitted per layer as ``WeightOnlyConfig.scheme_for`` does);
    - ``"salient"``: RTN, then the ``fraction`` of input channels with the largest mean
      ``|x|`` on ``calib_ids`` (at least one per layer) get their float weight columns back
      (the paper keeps them in fp16; here in the model's float dtype);
    - ``"random"``: the same number of channels, chosen at random (seeded).

    Scales are computed from the whole weight before columns are restored, as in the lab.
    The embedding and lm_head stay float. The model is left unchanged. Also returns
    ``"fraction"``. Expected: salient much closer to fp32 than random, random close to rtn.
    """
    if not 0 < fraction < 1:
        raise UserError(f"the salient fraction must be in (0, 1), got {fraction}")
    linears = {
        f"layers.{i}.{n}": m
        for i, block in enumerate(model.layers)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }
    importance = input_abs_mean(model, calib_ids, list(linears))
    fit = WeightOnlyConfig(scheme)
    gen = torch.Generator().manual_seed(seed)
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    quantized, keep_salient, keep_random = {}, {}, {}
    for n, w in originals.items():
        k = max(1, round(fraction * w.shape[1]))
        quantized[n] = fake_quantize(w, fit.scheme_for(w.shape[1])).to(w.dtype)
        keep_salient[n] = importance[n].topk(k).indices
        keep_random[n] = torch.randperm(w.shape[1], generator=gen)[:k]

    def evaluate(keep: dict[str, Tensor] | None) -> float:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(quantized[n])
                if keep is not None:
                    m.weight[:, keep[n]] = originals[n][:, keep[n]]
        return perplexity_of(model, eval_ids)

    out = {"fp32": perplexity_of(model, eval_ids), "fraction": fraction}
    try:
        out["rtn"] = evaluate(None)
        out["salient"] = evaluate(keep_salient)
        out["random"] = evaluate(keep_random)
    finally:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(originals[n])
    return out


def layer_error_report(
    float_model: Transformer, quant_model: Transformer, ids: Tensor
) -> list[dict]:
    """Where the quantization error comes from and how it grows, on token windows ``ids``.

    Rows, in forward order:

    - ``kind="linear"``, one per :class:`QuantLinear` of ``quant_model``: ``rel_output_error``
      ``= ||y_q - y|| / ||y||`` (over all tokens) where ``y`` is the float layer's output and
      ``y_q`` the quantized layer's, both on the SAME input: what the float model feeds that
      layer. So each layer's own error, without the errors of the layers before it;
    - ``kind="residual"``, one per block: ``rel_error`` of the residual stream after the block,
      ``||h_q - h|| / ||h||``, when each model runs on its own (the accumulated error);
    - ``kind="logits"``: the same for the final logits.

    Every row has ``name`` and ``depth`` (the block index; the number of blocks for the head
    and logits). The per-layer rows need the two models to agree on the layers' input
    coordinates: for AWQ, fold the scales into a float copy (``awq_(scaled, ids, config,
    quantize=False)``), pass it as ``float_model`` and quantize a copy of it (``awq_(q, ids,
    config, grid=1)``: alpha 0 only, so clipping without new scales). The two models' norm
    weights must match (checked). The residual and logits rows do not depend on it: the scales
    never touch the residual stream.
    """
    n_blocks = len(float_model.layers)
    if len(quant_model.layers) != n_blocks:
        raise UserError("the float and quantized models have different numbers of blocks")
    _check_same_norms(float_model, quant_model)
    pairs = _layer_pairs(float_model, quant_model)
    sums = {n: [0.0, 0.0] for n in pairs}
    resid = [[0.0, 0.0] for _ in range(n_blocks + 1)]

    def record(name: str, qlin: QuantLinear, head: bool):
        def fn(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            x = out if head else args[0]  # the head's input is the final norm's output
            y = _float_head(float_model, x) if head else out
            _accumulate(sums[name], qlin(x).float(), y.float())

        return fn

    handles = []
    for name, (fmod, qlin) in pairs.items():
        head = name == "lm_head" and fmod is float_model.norm
        handles.append(fmod.register_forward_hook(record(name, qlin, head)))
    try:
        with torch.no_grad():
            for batch in ids.split(BATCH):
                h, rope = embed_inputs(float_model, batch)
                hq, _ = embed_inputs(quant_model, batch)
                for i, (fb, qb) in enumerate(
                    zip(float_model.layers, quant_model.layers, strict=True)
                ):
                    h, hq = fb(h, rope), qb(hq, rope)
                    _accumulate(resid[i], hq, h)
                _accumulate(resid[n_blocks], quant_model.logits(hq), float_model.logits(h))
    finally:
        for hd in handles:
            hd.remove()
    rows: list[dict] = []
    for i in range(n_blocks + 1):
        for name, acc in sums.items():
            if _depth(name, n_blocks) == i:
                rows.append(
                    {"name": name, "depth": i, "kind": "linear", "rel_output_error": _rel(acc)}
                )
        if i < n_blocks:
            rows.append(
                {"name": f"layers.{i}", "depth": i, "kind": "residual", "rel_error": _rel(resid[i])}
            )
    rows.append(
        {"name": "logits", "depth": n_blocks, "kind": "logits", "rel_error": _rel(resid[n_blocks])}
    )
    return rows


def _layer_pairs(
    float_model: Transformer, quant_model: Transformer
) -> dict[str, tuple[nn.Module, QuantLinear]]:
    """name -> (float module to hook, quantized layer), in the quant model's module order.
    A quantized head of a tied model has no float linear: hook the final norm instead."""
    float_linears = {n: m for n, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    pairs = {}
    # remove_duplicate=False: a quantized tied table is listed as "lm_head" too
    for name, q in quant_model.named_modules(remove_duplicate=False):
        if not isinstance(q, QuantLinear) or name == "embed.layer":  # the lookup: not a linear
            continue
        if name in float_linears:
            pairs[name] = (float_linears[name], q)
        elif name == "lm_head" and "lm_head" not in float_model._modules:
            pairs[name] = (float_model.norm, q)
        else:
            raise UserError(f"quantized layer {name} has no float linear in the float model")
    return pairs


def _float_head(model: Transformer, h: Tensor) -> Tensor:
    return h @ model.embed.weight.t()  # tied: the head is the embedding table


def _check_same_norms(a: nn.Module, b: nn.Module) -> None:
    qb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        if "norm" in name and name in qb and not torch.equal(p, qb[name]):
            raise UserError(
                f"{name} differs between the float and quantized models (an AWQ model?): pass "
                "the float model with the same scales folded in"
            )


def _accumulate(acc: list[float], approx: Tensor, exact: Tensor) -> None:
    acc[0] += (approx.float() - exact.float()).square().sum().item()
    acc[1] += exact.float().square().sum().item()


def _rel(acc: list[float]) -> float:
    return math.sqrt(acc[0] / acc[1]) if acc[1] > 0 else 0.0


def _depth(name: str, n_blocks: int) -> int:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else n_blocks
