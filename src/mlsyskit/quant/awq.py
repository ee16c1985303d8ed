"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), weight only.

A few input channels of each linear layer see much larger activations than the rest; the
rounding error of their weights is multiplied by those activations. AWQ protects them without
keeping anything in float: for ``y = x W^T`` and a per-input-channel scale ``s > 0``,

    y = (x / s) (W diag(s))^T,

so quantizing ``W diag(s)`` instead of ``W`` gives large-activation channels a finer grid
(relative to their size). ``x / s`` costs nothing when the operation before the linear is
per-channel linear: ``s`` is folded into it (a norm's weight and bias, or the rows of a
previous linear). The scale is ``s = mean|x|^alpha`` (normalised by ``sqrt(max s * min s)``,
as in the paper's code), with ``alpha`` picked per scaling group by a grid search.

Scaling groups of each block (each named by the linear whose inputs are scaled):

- ``attn_norm -> attn.qkv`` and ``ffn_norm -> ffn.gate_up`` (``ffn.up`` for GPT-2);
- ``v rows of attn.qkv -> attn.o_proj``, only when ``n_kv_heads == n_heads``: the attention
  output is linear in v, channel by channel. With grouped-query attention one v channel feeds
  several o_proj inputs that would each want their own scale, so the fold is not exact: skipped;
- ``up rows of ffn.gate_up -> ffn.down`` (Llama): ``silu(gate) * up`` is linear in ``up``.
  GPT-2's ``gelu(up)`` is not, so its ``down`` is not scaled.

The lm_head (or the tied embedding used as head) is quantized by plain RTN: the final norm
could absorb a scale, but the tied embedding table could not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mlsyskit.errors import UserError
from mlsyskit.models.blocks import Block, Rope
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant.calibration import embed_inputs, recorded_inputs
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig, quantize_
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import fake_quantize, search_clip_ratio

BATCH = 8  # calibration windows per block forward


@dataclass
class AWQResult:
    """What the search chose, per scaling group (keyed by the scaled linear, e.g.
    ``"layers.3.attn.qkv"``): ``alphas`` in ``[0, 1)`` (0 = plain RTN) and the relative output
    error ``||X (W_q - W)^T|| / ||X W^T||`` of that linear on the calibration inputs with RTN
    (``errors_rtn``) and with the chosen scales (``errors_awq``), before any clipping."""

    alphas: dict[str, float] = field(default_factory=dict)
    errors_rtn: dict[str, float] = field(default_factory=dict)
    errors_awq: dict[str, float] = field(default_factory=dict)


@dataclass
class _Group:
    """``linear``'s input columns are multiplied by s; ``prev``'s output (all of it for a norm,
    rows ``rows`` for a linear) is divided by s."""

    name: str
    linear: nn.Linear
    prev: nn.Module
    rows: slice | None = None


def awq_(
    model: Transformer,
    calib_ids: Tensor,
    config: WeightOnlyConfig,
    grid: int = 20,
    clip: bool = True,
    progress: bool = False,
    *,
    quantize: bool = True,
) -> AWQResult:
    """Apply AWQ to ``model`` in place and quantize it with ``config``; returns the choices.

    Block by block, on the calibration windows ``calib_ids`` (windows, T):

    1. one float forward of the block records the inputs of its linears (and gives the next
       block's input: folding is exact, so the scaled block computes the same output);
    2. per scaling group, try ``alpha = 0, 1/grid, ..., (grid-1)/grid``: fake-quantize
       ``W diag(s)`` with ``config.scheme_for(in_features)`` and measure the group linear's
       output error on the recorded inputs; keep the best (only a strictly smaller error
       replaces alpha = 0, which is RTN, so AWQ never does worse than RTN on this objective);
    3. fold the scales (exact in float: the model's function is unchanged);
    4. with ``clip``, pick per-output-row clip ratios by the same output error
       (:func:`search_clip_ratio`; the q and k rows of ``qkv`` keep ratio 1, as in the paper's
       code: their error is seen through the softmax, not directly), then replace the block's
       linears by :class:`QuantLinear`.

    Finally :func:`quantize_` quantizes what is left (the lm_head). Layers ``config.filter``
    rejects are neither scaled nor quantized. With ``quantize=False`` only steps 1-3 run: the
    model stays float with the scales folded in (its logits are unchanged).
    """
    _check(model, calib_ids, grid)
    result = AWQResult()
    x, rope = embed_inputs(model, calib_ids)
    blocks = list(enumerate(model.layers))
    for i, block in tqdm(blocks, desc="AWQ", unit="block", disable=not progress):
        prefix = f"layers.{i}."
        linears = {
            prefix + n: m
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and (config.filter is None or config.filter(prefix + n, m))
        }
        with recorded_inputs(linears) as rec, torch.no_grad():
            x = _run_block(block, x, rope)
        inputs = {n: torch.cat(rec.pop(n)) for n in linears}
        roots = {n: gram_root(v) for n, v in inputs.items()}
        for g in _groups(block, prefix):
            if g.name not in linears:
                continue
            scheme = config.scheme_for(g.linear.in_features, g.name)
            x_mean = inputs[g.name].abs().mean(0)
            alpha, s, err_rtn, err_awq = search_scale(
                g.linear.weight, roots[g.name], x_mean, scheme, grid
            )
            result.alphas[g.name] = alpha
            result.errors_rtn[g.name] = err_rtn
            result.errors_awq[g.name] = err_awq
            if alpha > 0:
                _fold(g, s)
                roots[g.name] = roots[g.name] / s  # the linear now receives x / s
        del inputs
        if quantize:
            _quantize_block(block, prefix, linears, roots, config, clip)
    if quantize:
        quantize_(model, config)
    return result


def search_scale(
    w: Tensor, x: Tensor, x_mean: Tensor, scheme: QuantScheme, grid: int = 20
) -> tuple[float, Tensor, float, float]:
    """Grid search of AWQ's exponent for one linear with weight ``w`` (out, in).

    ``x`` (n, in): calibration inputs (or any matrix with the same ``x^T x``, see
    :func:`gram_root`); ``x_mean`` (in,): mean ``|x|`` per channel. Returns ``(alpha, s,
    error at alpha=0, error at alpha)`` with ``s`` the (in,) scales of the best alpha and errors
    relative: ``||x (W_q - W)^T|| / ||x W^T||`` where ``W_q = Q(W diag(s)) diag(s)^-1``.
    """
    w = w.detach().float()
    x = x.float()
    ref = (x @ w.T).square().sum().clamp(min=1e-30)
    base = x_mean.float().clamp(min=1e-4)  # dead channels: no infinite or zero scale
    best = (float("inf"), 0.0, torch.ones_like(base))
    err_rtn = float("nan")
    for k in range(grid):
        alpha = k / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        w_q = fake_quantize(w * s, scheme) / s
        err = (x @ (w_q - w).T).square().sum().item()
        if k == 0:
            err_rtn = err
        if err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return alpha, s, (err_rtn / ref.item()) ** 0.5, (err / ref.item()) ** 0.5


def gram_root(x: Tensor) -> Tensor:
    """A matrix ``r`` with ``r^T r = x^T x`` and at most ``in`` rows, for ``x`` (n, in).

    Every objective here is a sum of squares ``||x d^T||^2`` over calibration tokens, which
    depends on ``x`` only through ``x^T x``; when there are more tokens than channels, its
    Cholesky factor ``r = L^T`` (``x^T x = L L^T``) gives the same errors with fewer rows, or
    ``r = sqrt(E) V^T`` (``x^T x = V E V^T``) when it is singular (e.g. dead channels).
    """
    n, k = x.shape
    if n <= k:
        return x.float()
    g = (x.T.float() @ x.float()).double()
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol.T.float()
    evals, evecs = torch.linalg.eigh(g)  # slower, but fine with a singular x^T x
    return (evals.clamp(min=0).sqrt().unsqueeze(1) * evecs.T).float()


def _check(model: nn.Module, calib_ids: Tensor, grid: int) -> None:
    if not isinstance(model, Transformer):
        raise UserError("AWQ needs a mlsyskit Transformer (build_transformer)")
    if any(isinstance(m, QuantLinear) for m in model.layers.modules()):
        raise UserError("AWQ needs a float model: this one is already quantized")
    if not isinstance(grid, int) or grid < 1:
        raise UserError(f"the AWQ grid must be a positive integer, got {grid!r}")
    if not isinstance(calib_ids, Tensor) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise UserError("calibration ids must be a non-empty (windows, tokens) tensor")


def _run_block(block: Block, x: Tensor, rope: Rope | None) -> Tensor:
    return torch.cat([block(xb, rope) for xb in x.split(BATCH)])


def _groups(block: Block, prefix: str) -> list[_Group]:
    """The block's scaling groups (see the module docstring), in forward order."""
    attn, ffn = block.attn, block.ffn
    if not attn.qkv_fused:
        raise UserError("AWQ expects the fused qkv projection of mlsyskit's Transformer")
    groups = [_Group(prefix + "attn.qkv", attn.qkv, block.attn_norm)]
    if attn.n_kv_heads == attn.n_heads:
        q = attn.n_heads * attn.head_dim
        v_rows = slice(2 * q, 3 * q)  # rows [q | k | v], all the same size without GQA
        groups.append(_Group(prefix + "attn.o_proj", attn.o_proj, attn.qkv, v_rows))
    if ffn.activation == "swiglu":
        h = ffn.down.in_features
        groups.append(_Group(prefix + "ffn.gate_up", ffn.gate_up, block.ffn_norm))
        groups.append(_Group(prefix + "ffn.down", ffn.down, ffn.gate_up, slice(h, 2 * h)))
    else:
        groups.append(_Group(prefix + "ffn.up", ffn.up, block.ffn_norm))
    return groups


def _fold(g: _Group, s: Tensor) -> None:
    """``prev``'s output channels / s, ``linear``'s input columns * s: the same function."""
    with torch.no_grad():
        g.linear.weight.mul_(s.to(g.linear.weight.dtype))
        weight, bias = g.prev.weight, getattr(g.prev, "bias", None)
        if g.rows is None:  # a norm: y = norm(x) * weight (+ bias)
            weight.div_(s.to(weight.dtype))
            if bias is not None:
                bias.div_(s.to(bias.dtype))
        else:  # a linear: its output rows
            weight[g.rows].div_(s.to(weight.dtype).unsqueeze(1))
            if bias is not None:
                bias[g.rows].div_(s.to(bias.dtype))


def _quantize_block(
    block: Block,
    prefix: str,
    linears: dict[str, nn.Linear],
    inputs: dict[str, Tensor],
    config: WeightOnlyConfig,
    clip: bool,
) -> None:
    """Replace the block's selected linears by QuantLinear, with searched clip ratios."""
    for name, lin in linears.items():
        scheme = config.scheme_for(lin.in_features, name)
        ratio: float | Tensor = 1.0
        if clip:
            ratio = torch.ones(lin.out_features, 1)
            first = 0
            if name == prefix + "attn.qkv":  # q and k rows keep ratio 1 (see awq_)
                first = lin.out_features - block.attn.n_kv_heads * block.attn.head_dim
            ratio[first:] = search_clip_ratio(lin.weight[first:], scheme, inputs[name])
        parent_name, _, child = name.removeprefix(prefix).rpartition(".")
        setattr(
            block.get_submodule(parent_name), child, QuantLinear.from_linear(lin, scheme, ratio)
        )
