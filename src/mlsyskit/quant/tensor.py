"""Round-to-nearest weight quantization: QuantizedTensor, quantize/dequantize, clip search.

A weight ``w`` of shape (out, in) is cut into scale groups: the whole tensor, each output row
("channel") or each ``group_size`` inputs of a row ("group"). Per group, with codes
``q in [qmin, qmax]`` (see ``QuantScheme``):

- symmetric:  ``S = ratio * max|w| / qmax``, ``Z = 0``;
- asymmetric: ``S = ratio * (max(w, 0) - min(w, 0)) / (2^b - 1)``,
  ``Z = clamp(round(-ratio * min(w, 0) / S), 0, 2^b - 1)``. The range always contains 0 (as in
  GPTQ) so that Z is a valid code and 0.0 is represented exactly;

then ``q = clamp(round(w / S) + Z, qmin, qmax)`` and ``w ~ S (q - Z)``. ``ratio`` (clip ratio,
at most 1) trades clipping of outliers for resolution.

S is rounded *up* to the storage dtype (float16/bfloat16) before the codes are computed: the
stored scale is the one used, and rounding up keeps the unclipped range inside
``[S (qmin - Z), S (qmax - Z)]``, so every value in it is within S/2 of its dequantized value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlsyskit.errors import UserError
from mlsyskit.quant.scheme import QuantScheme

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight: ``dequantize() = scale * (codes - zero)`` per scale group.

    - ``codes``: (out, in), unpacked; int8 when symmetric, uint8 when asymmetric.
    - ``scale``: float32, (1, 1) for "tensor", (out, 1) for "channel", (out, n_groups) for
      "group"; its values are exactly representable in ``scheme.scale_dtype``.
    - ``zero``: asymmetric only: integer zero points in [0, 2^b - 1] as float32, shaped like
      ``scale`` (float, so ``codes - zero`` cannot wrap around); None when symmetric or with
      float zero points.
    - ``minimum``: float zero points only (``scheme.zero_point == "float"``): the group
      minimums, shaped like ``scale``; the weight is ``scale * codes + minimum``.

    With double-quantized scales, ``scale`` (and ``minimum``) hold ``d * c``: a 6-bit code
    times its super-block's scale, each product exact in float32.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    scheme: QuantScheme
    minimum: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    def dequantize(self) -> Tensor:
        """The float32 (out, in) weight ``S (q - Z)``."""
        out, inf = self.shape
        g = self.scale.shape[1]
        q = self.codes.float().reshape(out, g, inf // g)
        if self.minimum is not None:
            w = q * self.scale.float().unsqueeze(-1) + self.minimum.float().unsqueeze(-1)
            return w.reshape(out, inf)
        if self.zero is not None:
            q = q - self.zero.float().unsqueeze(-1)
        return (q * self.scale.float().unsqueeze(-1)).reshape(out, inf)

    def kernel_zero(self) -> Tensor | None:
        """The zero point the kernels take (``w = scale (q - zero)``): ``zero``, or for float
        zero points ``-minimum / scale`` (equal to the stored form up to float32 rounding)."""
        if self.minimum is not None:
            return -self.minimum.float() / self.scale.float()
        return self.zero

    def representable_range(self) -> tuple[Tensor, Tensor]:
        """(lo, hi) per scale group, shaped like ``scale``: ``S (qmin - Z)``, ``S (qmax - Z)``."""
        if self.minimum is not None:
            return self.minimum.float(), self.minimum.float() + self.scale * self.scheme.qmax
        z = self.zero.float() if self.zero is not None else 0.0
        return self.scale * (self.scheme.qmin - z), self.scale * (self.scheme.qmax - z)


def quantize_tensor(
    w: Tensor, scheme: QuantScheme, clip_ratio: float | Tensor = 1.0
) -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight (out, in) (see the module docstring).

    ``clip_ratio`` in (0, 1] scales the range: a float, or a per-output-row tensor of shape
    (out, 1) or (out,) (shared by the groups of a row; must be uniform for "tensor").
    All-zero groups get scale 1 (codes = Z, so they dequantize to exactly 0, never NaN).
    """
    w = _check_weight(w)
    out, inf = w.shape
    g = scheme.n_groups(inf)
    wg = w.reshape(1, 1, -1) if scheme.granularity == "tensor" else w.reshape(out, g, inf // g)
    ratio = _clip_ratio(clip_ratio, out, scheme).to(w.device)
    if scheme.zero_point == "float":
        return _quantize_float_zero(w, wg, ratio, scheme)

    if scheme.symmetric:
        scale = wg.abs().amax(-1) * ratio / scheme.qmax
    else:
        lo = wg.amin(-1).clamp(max=0) * ratio
        hi = wg.amax(-1).clamp(min=0) * ratio
        scale = (hi - lo) / scheme.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = double_quantize(scale, scheme) if scheme.double_quant else _store_scale(scale, scheme)

    q = torch.round(wg / scale.unsqueeze(-1))
    zero = None
    if not scheme.symmetric:
        zero = torch.round(-lo / scale).clamp(0, scheme.qmax)
        q = q + zero.unsqueeze(-1)
    q = q.clamp(scheme.qmin, scheme.qmax).reshape(out, inf)
    codes = q.to(torch.int8 if scheme.symmetric else torch.uint8)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, scheme=scheme)


def _quantize_float_zero(w: Tensor, wg: Tensor, ratio: Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """``w ~ S q + m`` per group: the clip ratio shrinks ``[min, max]`` about its middle; S is
    rounded up and m to nearest in the storage format (or double-quantized, m <= 0)."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    if scheme.double_quant:  # K-quant minimums are subtracted 6-bit codes: at most 0
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
    lo, hi = mid - half, mid + half
    if scheme.double_quant:
        lo = lo.clamp(max=0)
    scale = (hi - lo) / scheme.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scheme.double_quant:
        scale = double_quantize(scale, scheme)
        minimum = -double_quantize(-lo, scheme, at_least_one=False)
    else:
        scale = _store_scale(scale, scheme)
        minimum = lo.to(SCALE_DTYPES[scheme.scale_dtype]).float()
        if not bool(torch.isfinite(minimum).all()):
            raise UserError(f"weight range too large for {scheme.scale_dtype} minimums; use scale_dtype='bfloat16'")
    q = torch.round((wg - minimum.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, scheme.qmax)
    codes = q.reshape(w.shape).to(torch.uint8)
    return QuantizedTensor(codes=codes, scale=scale, zero=None, scheme=scheme, minimum=minimum)


def double_quantize(v: Tensor, scheme: QuantScheme, at_least_one: bool = True) -> Tensor:
    """Non-negative per-group values ``v`` (rows, groups) as ``d * c``: ``c`` 6-bit codes,
    ``d`` one ``scheme.scale_dtype`` value per ``super_groups`` groups of a row, rounded up
    so that the largest value of a super-block gets code 63 (what lets storage recover d as
    ``max / 63`` exactly). ``at_least_one``: codes of at least 1 (a scale must not be 0)."""
    rows, g = v.shape
    sg = scheme.super_groups
    nsb = -(-g // sg)
    vp = torch.nn.functional.pad(v.float(), (0, nsb * sg - g)).view(rows, nsb, sg)
    top = vp.amax(-1, keepdim=True)
    d = _store_scale(torch.where(top > 0, top / 63, torch.ones_like(top)), scheme)
    c = torch.round(vp / d).clamp(1 if at_least_one else 0, 63)
    c = torch.where((vp == top) & (top > 0), torch.full_like(c, 63.0), c)
    return (d * c).view(rows, nsb * sg)[:, :g].contiguous()


def dequantize_tensor(qt: QuantizedTensor) -> Tensor:
    """The float32 weight of ``qt`` (same as ``qt.dequantize()``)."""
    return qt.dequantize()


def fake_quantize(w: Tensor, scheme: QuantScheme, clip_ratio: float | Tensor = 1.0) -> Tensor:
    """``dequantize(quantize(w))``: the float32 weight a quantized layer really uses."""
    return quantize_tensor(w, scheme, clip_ratio).dequantize()


def theoretical_max_error(qt: QuantizedTensor, w: Tensor | None = None) -> Tensor:
    """Per-element bound on ``|w - qt.dequantize()|``, shape (out, in).

    Without ``w``: ``scale / 2``, the round-to-nearest bound for values inside the (clipped)
    representable range. With the original ``w``: values outside the range are clamped to its
    end (a grid point), so their bound is the larger of ``scale / 2`` and their distance to it.
    """
    out, inf = qt.shape
    g = qt.scale.shape[1]

    def per_element(t: Tensor) -> Tensor:
        return t.unsqueeze(-1).expand(-1 if t.shape[0] > 1 else out, g, inf // g).reshape(out, inf)

    half = per_element(qt.scale.float() / 2)
    if w is None:
        return half
    lo, hi = (per_element(t) for t in qt.representable_range())
    w = w.detach().float()
    outside = torch.maximum(lo - w, w - hi).clamp(min=0)
    return torch.maximum(half, outside)


def search_clip_ratio(
    w: Tensor,
    scheme: QuantScheme,
    x: Tensor | None = None,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> Tensor:
    """The per-output-row clip ratio (out, 1) in [min_ratio, 1] that minimises the error.

    Tries ``grid`` ratios evenly spaced from 1 down to ``min_ratio`` and keeps, per row, the
    one with the smallest output error ``sum_n (x w^T - x w_q^T)^2`` over calibration inputs
    ``x`` (n, in), or the weight MSE ``sum (w - w_q)^2`` without ``x``. Ratio 1 is tried first
    and only a strictly smaller error replaces it, so the result never does worse than 1.
    For "tensor" granularity (one scale) a single ratio minimises the total error.
    """
    w = _check_weight(w)
    out, inf = w.shape
    if not isinstance(grid, int) or grid < 1:
        raise UserError(f"clip search grid must be a positive integer, got {grid!r}")
    if not 0 < min_ratio <= 1:
        raise UserError(f"min_ratio must be in (0, 1], got {min_ratio}")
    if x is not None:
        if x.dim() != 2 or x.shape[1] != inf:
            raise UserError(f"calibration inputs must have shape (n, {inf}), got {tuple(x.shape)}")
        x = x.detach().float().to(w.device)
    best_err = torch.full((out,), float("inf"), device=w.device)
    best = torch.ones(out, device=w.device)
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        err = clip_objective(w, fake_quantize(w, scheme, r), x)
        if scheme.granularity == "tensor":
            err = err.sum().expand(out)  # one shared scale: compare totals
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best.unsqueeze(1)


def clip_objective(w: Tensor, w_q: Tensor, x: Tensor | None = None) -> Tensor:
    """Per-row error (out,): ``sum_n ((w - w_q) x_n)^2`` with inputs ``x``, else ``sum (w - w_q)^2``."""
    d = w.float() - w_q.float()
    if x is None:
        return (d * d).sum(1)
    e = x.float() @ d.T
    return (e * e).sum(0)


def quantize_bias(bias: Tensor, input_scale: Tensor | float, weight_scale: Tensor) -> Tensor:
    """int32 codes of ``bias`` at scale ``S_bias = S_in * S_w`` (per output channel).

    For an integer linear layer with symmetric int activations ``x_q`` (one scale ``S_in``)
    and symmetric weights ``w_q`` (per-tensor or per-channel scales ``S_w``):
    ``y_j ~ S_in * S_w[j] * (sum_k x_q[k] w_q[j, k] + b_q[j])`` with the int32 accumulator,
    so the bias is added in the accumulator's own units. ``weight_scale`` is (out, 1), (out,)
    or one value; group-wise scales are refused (they vary along the reduction). Codes are
    rounded to nearest and saturated to the int32 range.
    """
    s_in = torch.as_tensor(input_scale, dtype=torch.float32, device=bias.device)
    if s_in.numel() != 1:
        raise UserError("quantize_bias takes one input scale (per-tensor activations)")
    s_w = weight_scale.detach().float().to(bias.device)
    if s_w.dim() > 2 or (s_w.dim() == 2 and s_w.shape[1] != 1):
        raise UserError(
            f"quantize_bias needs per-tensor or per-channel weight scales, got shape "
            f"{tuple(s_w.shape)} (group-wise scales cannot fold into an int32 accumulator)"
        )
    s_b = (s_in.reshape(()) * s_w.reshape(-1)).double()
    if not bool((s_b > 0).all()):
        raise UserError("quantize_bias needs positive scales")
    info = torch.iinfo(torch.int32)
    q = torch.round(bias.detach().double().reshape(-1) / s_b)
    return q.clamp(info.min, info.max).to(torch.int32)


def _check_weight(w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise UserError(f"can only quantize 2-D weights (out, in), got {shape}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise UserError("cannot quantize a weight that contains NaN or inf")
    return w


def _clip_ratio(clip_ratio: float | Tensor, out: int, scheme: QuantScheme) -> Tensor:
    """The clip ratio shaped to broadcast over the (rows, groups) scale statistics."""
    r = torch.as_tensor(clip_ratio, dtype=torch.float32).detach()
    if r.numel() != 1 and tuple(r.shape) not in ((out, 1), (out,)):
        raise UserError(f"clip_ratio must be a number or shape ({out}, 1), got {tuple(r.shape)}")
    if not bool(((r > 0) & (r <= 1)).all()):
        raise UserError("clip_ratio must be in (0, 1]")
    if r.numel() == 1:
        return r.reshape(1, 1)
    if scheme.granularity == "tensor":
        if not bool((r == r.reshape(-1)[0]).all()):
            raise UserError("'tensor' granularity has one scale: give one clip ratio")
        return r.reshape(-1)[:1].reshape(1, 1)
    return r.reshape(out, 1)


def _store_scale(scale: Tensor, scheme: QuantScheme) -> Tensor:
    """Positive float32 scales rounded *up* to the storage dtype, back in float32."""
    dtype = SCALE_DTYPES[scheme.scale_dtype]
    s = scale.to(dtype)
    low = s.float() < scale
    # for positive floats the next representable value is the next bit pattern
    s = torch.where(low, (s.view(torch.int16) + 1).view(dtype), s)
    if not bool(torch.isfinite(s).all()):
        raise UserError(
            f"weight range too large for {scheme.scale_dtype} scales; use scale_dtype='bfloat16'"
        )
    return s.float()
