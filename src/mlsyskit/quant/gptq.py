"""GPTQ (Frantar et al., ICLR 2023): quantization with Hessian-based error compensation.

For a linear layer with weight ``W`` (out, in) and calibration inputs ``X`` (n, in), the layer
objective is ``||X (W - W_q)^T||^2 = sum_r d_r H d_r^T`` with ``H = X^T X`` and ``d_r`` row r of
``W - W_q``: rows are independent and share ``H``. GPTQ quantizes the columns one at a time;
after column ``i`` is rounded, the error is spread over the columns not yet quantized with the
optimal-brain-surgeon update

    W[:, F] -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_(i, F)

(F: the columns after i, ``H_F^-1`` the inverse Hessian over the columns still free). The rows
``[H_F^-1]_(i, F) / sqrt([H_F^-1]_ii)`` are the rows of the upper Cholesky factor of ``H^-1``, so
one factorisation gives every update; updates are applied lazily, ``block`` columns at a time.

- damping: ``H + damp * mean(diag H) * I`` (1 % by default) keeps ``H`` invertible;
- ``act_order``: columns in order of decreasing ``diag H`` (largest activations first). Our
  groups are contiguous in the original order, so with act_order the group scales are fixed
  from the unmodified weight before the pass ("static groups"); without it each group's scale
  is chosen when the pass reaches the group, from the already-updated weights (as the paper);
- per row, the result is kept only where it beats round-to-nearest on the layer objective, so
  GPTQ is never worse than RTN on it (GPTQ's greedy pass almost always wins anyway).

:func:`gptq_` quantizes a whole Transformer block by block on calibration windows, each block
on the inputs the already-quantized blocks before it produce (sequential, as the paper); the
output projection from the final norm's outputs (for a tied model the embedding table: the
quantized table then serves the lookups too). After AWQ's scales are folded in (``awq_(..., quantize=False)``), it gives AWQ+GPTQ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mlsyskit.errors import UserError
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant.calibration import embed_inputs, recorded_inputs
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig, install_tied_table
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import QuantizedTensor, quantize_tensor

BATCH = 8  # calibration windows per block forward
DAMP = 0.01


def hessian(x: Tensor) -> Tensor:
    """``X^T X`` (in, in) of inputs ``x`` (..., in), computed in float32 (a float64 product of
    thousands of tokens costs several times more) and returned in float64."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.T @ x).double()


def layer_objective(w: Tensor, w_q: Tensor, h: Tensor) -> Tensor:
    """Per row (out,): ``d_r H d_r^T`` with ``d = w - w_q``: the output error on the inputs
    whose Hessian is ``h``."""
    d = (w.double() - w_q.double())
    return ((d @ h.double()) * d).sum(1)


def _params(w: Tensor, scheme: QuantScheme, ratio: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(scale, zero, minimum), each (out, 1) or None, of the columns ``w`` as one group,
    exactly as :func:`quantize_tensor` chooses them (storage rounding and clip ratio included)."""
    one = dataclasses.replace(scheme, granularity="channel", double_quant=False)
    qt = quantize_tensor(w.float(), one, ratio)
    return tuple(None if t is None else t.to(w.dtype) for t in (qt.scale, qt.zero, qt.minimum))  # type: ignore[return-value]


def _codes(w: Tensor, scale: Tensor, zero: Tensor | None, minimum: Tensor | None, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """(codes, dequantized values) of one column."""
    if minimum is not None:
        q = torch.round((w - minimum) / scale).clamp(0, scheme.qmax)
        return q, scale * q + minimum
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    q = q.clamp(scheme.qmin, scheme.qmax)
    return q, scale * (q - (0 if zero is None else zero))


def inverse_cholesky(h: Tensor, damp: float = DAMP) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (float64)."""
    h = h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-12))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise UserError("GPTQ: the damped Hessian is not positive definite; raise the damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_quantize(
    w: Tensor,
    h: Tensor,
    scheme: QuantScheme,
    *,
    damp: float = DAMP,
    act_order: bool = False,
    clip_ratio: float | Tensor = 1.0,
    block: int = 128,
    dtype: torch.dtype = torch.float32,
    fallback: bool = True,
) -> QuantizedTensor:
    """GPTQ of the weight ``w`` (out, in) with Hessian ``h`` = ``X^T X`` (in, in) of its inputs
    (see the module docstring). ``clip_ratio`` scales the group ranges as in
    :func:`quantize_tensor`; ``dtype``: the precision of the pass (float64 for reference
    checks); ``fallback``: keep RTN rows that GPTQ does not beat."""
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise UserError(f"GPTQ needs a (out, in) weight and an (in, in) Hessian, got {tuple(w.shape)} and {tuple(h.shape)}")
    out, cols = w.shape
    groups = scheme.n_groups(cols)
    gs = cols // groups if scheme.granularity == "group" else cols
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32)
    ratio = ratio.reshape(-1, 1) if ratio.numel() > 1 else ratio.reshape(1, 1)
    W = w.detach().to(dtype).clone()
    H = h.detach().double().clone()
    dead = H.diagonal() == 0  # channels that never fire: any value is exact; use 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    # double-quantized scales are shared by super-blocks of groups: fixed up front too
    dynamic = scheme.granularity == "group" and not act_order and not scheme.double_quant
    floatzero = scheme.zero_point == "float"
    if dynamic:  # filled in as the pass reaches each group
        scales = torch.ones(out, groups, dtype=dtype)
        zeros = None if scheme.symmetric or floatzero else torch.zeros(out, groups, dtype=dtype)
        mins = torch.zeros(out, groups, dtype=dtype) if floatzero else None
    else:  # from the unmodified weight, in the original column order
        qt0 = quantize_tensor(W.float(), scheme, ratio)
        scales, zeros, mins = (None if t is None else t.to(dtype).expand(out, groups).clone() for t in (qt0.scale, qt0.zero, qt0.minimum))
    W = W[:, perm]
    U = inverse_cholesky(H[perm][:, perm], damp).to(dtype)
    Q = torch.zeros_like(W)
    if dynamic:  # whole groups per lazy block, so a group's columns are all current at its start
        block = gs * max(1, block // gs)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = int(perm[i1 + i])  # original column index
            g = c // gs
            if dynamic and c % gs == 0:
                s, z, m = _params(W1[:, i : i + gs], scheme, ratio)
                scales[:, g : g + 1] = s
                if zeros is not None:
                    zeros[:, g : g + 1] = z
                if mins is not None:
                    mins[:, g : g + 1] = m
            q, deq = _codes(W1[:, i], scales[:, g], None if zeros is None else zeros[:, g], None if mins is None else mins[:, g], scheme)
            Q[:, i1 + i] = q
            err = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    qt = QuantizedTensor(
        codes=codes.to(torch.int8 if scheme.symmetric else torch.uint8),
        scale=scales.float(),
        zero=None if zeros is None else zeros.float(),
        scheme=_group_scheme(scheme, gs),
        minimum=None if mins is None else mins.float(),
    )
    if scheme.granularity == "tensor":
        qt.scale, qt.zero = qt.scale[:1, :1], None if qt.zero is None else qt.zero[:1, :1]
        qt.minimum = None if qt.minimum is None else qt.minimum[:1, :1]
    if fallback:
        qt = _keep_better_rows(w, h, qt, quantize_tensor(w.float(), qt.scheme, clip_ratio))
    return qt


def _group_scheme(scheme: QuantScheme, gs: int) -> QuantScheme:
    return scheme if scheme.granularity != "group" else dataclasses.replace(scheme, group_size=gs)


def _keep_better_rows(w: Tensor, h: Tensor, a: QuantizedTensor, b: QuantizedTensor) -> QuantizedTensor:
    """Row by row, whichever of ``a`` and ``b`` has the smaller layer objective (ties: ``a``)."""
    if a.scheme.granularity == "tensor":  # one shared scale: compare totals
        ea, eb = (layer_objective(w, t.dequantize(), h).sum() for t in (a, b))
        return a if ea <= eb else b
    worse = layer_objective(w, a.dequantize(), h) > layer_objective(w, b.dequantize(), h)
    if not bool(worse.any()):
        return a
    pick = worse.unsqueeze(1)
    return QuantizedTensor(
        codes=torch.where(pick, b.codes, a.codes),
        scale=torch.where(pick, b.scale, a.scale),
        zero=None if a.zero is None else torch.where(pick, b.zero, a.zero),
        scheme=a.scheme,
        minimum=None if a.minimum is None else torch.where(pick, b.minimum, a.minimum),
    )


@dataclass
class GPTQResult:
    """Per quantized linear: the layer objective relative to ``||X W^T||^2`` with RTN and with
    GPTQ, on the calibration inputs that layer saw."""

    errors_rtn: dict[str, float] = field(default_factory=dict)
    errors_gptq: dict[str, float] = field(default_factory=dict)


def _relative(w: Tensor, qt: QuantizedTensor, h: Tensor) -> float:
    ref = ((w.double() @ h.double()) * w.double()).sum().clamp(min=1e-30)
    return float((layer_objective(w, qt.dequantize(), h).sum() / ref).sqrt())


@torch.no_grad()
def gptq_(
    model: Transformer,
    calib_ids: Tensor,
    config: WeightOnlyConfig,
    *,
    damp: float = DAMP,
    act_order: bool = False,
    progress: bool = False,
) -> GPTQResult:
    """Quantize ``model``'s linear layers in place with GPTQ on the calibration windows
    ``calib_ids`` (windows, T), block by block (see the module docstring); layers
    ``config.filter`` rejects stay float. Returns the per-layer errors."""
    if not isinstance(model, Transformer):
        raise UserError("GPTQ needs a mlsyskit Transformer (build_transformer)")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UserError("GPTQ needs a float model: this one is already quantized")
    result = GPTQResult()
    x, rope = embed_inputs(model, calib_ids)
    for i, block in tqdm(list(enumerate(model.layers)), desc="GPTQ", unit="block", disable=not progress):
        prefix = f"layers.{i}."
        linears = {
            n: m
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and (config.filter is None or config.filter(prefix + n, m))
        }
        hs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
        with recorded_inputs(linears) as rec:
            for xb in x.split(BATCH):
                block(xb, rope)
                for n in linears:  # accumulate, so the inputs of one batch at a time are held
                    hs[n] += hessian(torch.cat(rec[n]))
                    rec[n].clear()
        for n, lin in linears.items():
            parent, _, child = n.rpartition(".")
            layer = _quantize_linear(prefix + n, lin.weight, hs[n], config, damp, act_order, result)
            setattr(block.get_submodule(parent), child, QuantLinear(layer, lin.bias))
        x = torch.cat([block(xb, rope) for xb in x.split(BATCH)])  # through the quantized block
    head = model._modules.get("lm_head")
    if config.include_lm_head and (head is None or isinstance(head, nn.Linear)):
        weight = model.embed.weight if head is None else head.weight
        if head is not None or model.cfg.tie_embeddings:
            if config.filter is None or head is None or config.filter("lm_head", head):
                h = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)
                for xb in x.split(BATCH):
                    h += hessian(model.norm(xb))
                qt = _quantize_linear("lm_head", weight, h, config, damp, act_order, result)
                if head is None:  # tied: the quantized table is the head and the lookup
                    install_tied_table(model, QuantLinear(qt))
                else:
                    model.lm_head = QuantLinear(qt, head.bias)
    return result


def _quantize_linear(
    name: str, w: Tensor, h: Tensor, config: WeightOnlyConfig, damp: float, act_order: bool, result: GPTQResult
) -> QuantizedTensor:
    w = w.detach().float()
    scheme = config.scheme_for(w.shape[1], name)
    qt = gptq_quantize(w, h, scheme, damp=damp, act_order=act_order)
    result.errors_rtn[name] = _relative(w, quantize_tensor(w, scheme), h)
    result.errors_gptq[name] = _relative(w, qt, h)
    return qt
