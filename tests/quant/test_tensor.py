"""Quantize/dequantize: error bounds by property tests, worked examples, clip search, bias."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsyskit.errors import UserError
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import (
    SCALE_DTYPES,
    clip_objective,
    dequantize_tensor,
    fake_quantize,
    quantize_bias,
    quantize_tensor,
    search_clip_ratio,
    theoretical_max_error,
)

schemes = st.builds(
    QuantScheme,
    bits=st.sampled_from([8, 4, 3, 2]),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.sampled_from([4, 8, 32]),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from(["float16", "bfloat16"]),
)


@st.composite
def weights(draw, scheme):
    """A random (out, in) weight, in divisible by the group, with zeros, a zero row, offsets."""
    out = draw(st.integers(1, 6))
    inf = scheme.group_size * draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    w = torch.randn(out, inf, generator=gen) * magnitude
    w += draw(st.sampled_from([0.0, 2.0, -3.0])) * magnitude  # all-positive / all-negative rows
    w[torch.rand(out, inf, generator=gen) < 0.1] = 0.0
    if draw(st.booleans()):
        w[draw(st.integers(0, out - 1))] = 0.0
    return w


def check_quantized(w, qt, scheme):
    out, inf = w.shape
    n_scale_rows = 1 if scheme.granularity == "tensor" else out
    assert qt.scale.shape == (n_scale_rows, scheme.n_groups(inf))
    assert qt.scale.dtype == torch.float32
    assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
    # the scale is exactly the stored one
    assert torch.equal(qt.scale.to(SCALE_DTYPES[scheme.scale_dtype]).float(), qt.scale)
    assert qt.codes.shape == w.shape
    assert qt.codes.dtype == (torch.int8 if scheme.symmetric else torch.uint8)
    codes = qt.codes.long()
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    if scheme.symmetric:
        assert qt.zero is None
    else:
        assert qt.zero.shape == qt.scale.shape and torch.equal(qt.zero, qt.zero.round())
        assert qt.zero.min() >= 0 and qt.zero.max() <= scheme.qmax


@settings(max_examples=120, deadline=None)
@given(st.data(), schemes)
def test_round_trip_within_half_a_step(data, scheme):
    w = data.draw(weights(scheme))
    qt = quantize_tensor(w, scheme)
    check_quantized(w, qt, scheme)
    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and torch.isfinite(deq).all()
    assert torch.equal(deq, dequantize_tensor(qt)) and torch.equal(deq, fake_quantize(w, scheme))
    bound = theoretical_max_error(qt)
    assert bound.shape == w.shape
    # unclipped: every value lies in the range, so round-to-nearest is within S/2 (+ fp error)
    assert ((w - deq).abs() <= bound * (1 + 1e-5) + 1e-6 * w.abs()).all()
    assert torch.equal(theoretical_max_error(qt, w), bound)
    # exact zero is represented exactly (symmetric: Z = 0; asymmetric: the range holds 0)
    assert (deq[w == 0] == 0).all()


@settings(max_examples=60, deadline=None)
@given(st.data(), schemes, st.floats(0.3, 1.0))
def test_clipped_round_trip_within_bound(data, scheme, ratio):
    w = data.draw(weights(scheme))
    qt = quantize_tensor(w, scheme, clip_ratio=ratio)
    check_quantized(w, qt, scheme)
    err = (w - qt.dequantize()).abs()
    # values inside the clipped range: S/2; outside: clamped to the range end
    bound = theoretical_max_error(qt, w)
    assert (err <= bound * (1 + 1e-5) + 1e-6 * w.abs()).all()
    inside = bound == theoretical_max_error(qt)
    assert (err[inside] <= bound[inside] * (1 + 1e-5) + 1e-6 * w.abs()[inside]).all()


def test_worked_examples():
    # 4-bit symmetric per channel: S = 7/7 = 1; 3.5 rounds half to even -> 4
    qt = quantize_tensor(torch.tensor([[-7.0, 3.5, 1.0, 0.0]]), QuantScheme(bits=4))
    assert qt.codes.tolist() == [[-7, 4, 1, 0]] and qt.scale.tolist() == [[1.0]]
    # 4-bit asymmetric: range [0, 7.5], S = 7.5 / 15 = 0.5, Z = 0
    qt = quantize_tensor(torch.tensor([[0.0, 1.5, 3.0, 7.5]]), QuantScheme(bits=4, symmetric=False))
    assert qt.codes.tolist() == [[0, 3, 6, 15]] and qt.scale.tolist() == [[0.5]]
    assert qt.zero.tolist() == [[0.0]]
    # 2-bit asymmetric with a negative minimum: range [-1, 2], S = 1, Z = 1
    qt = quantize_tensor(
        torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), QuantScheme(bits=2, symmetric=False)
    )
    assert qt.codes.tolist() == [[0, 1, 2, 3]] and qt.zero.tolist() == [[1.0]]
    assert qt.dequantize().tolist() == [[-1.0, 0.0, 1.0, 2.0]]
    # groups of 2: one scale per group
    s = QuantScheme(bits=8, granularity="group", group_size=2)
    qt = quantize_tensor(torch.tensor([[127.0, 1.0, 254.0, -2.0]]), s)
    assert qt.scale.tolist() == [[1.0, 2.0]] and qt.codes.tolist() == [[127, 1, 127, -1]]


def test_scale_is_rounded_up_to_the_storage_dtype():
    w = torch.tensor([[1.0, -0.3]])  # S = 1/127, not exact in float16
    qt = quantize_tensor(w, QuantScheme(bits=8))
    assert qt.scale.item() >= 1 / 127 and qt.scale.half().float().item() == qt.scale.item()
    assert qt.codes[0, 0] == 127  # 1.0 is not clamped: rounding up keeps it in range


def test_zero_and_tiny_weights_give_finite_results():
    for symmetric in (True, False):
        s = QuantScheme(bits=4, granularity="group", group_size=4, symmetric=symmetric)
        qt = quantize_tensor(torch.zeros(3, 8), s)
        assert (qt.scale == 1).all() and torch.equal(qt.dequantize(), torch.zeros(3, 8))
        tiny = torch.full((2, 8), 1e-12)
        qt = quantize_tensor(tiny, s)
        assert torch.isfinite(qt.dequantize()).all()
        assert ((tiny - qt.dequantize()).abs() <= theoretical_max_error(qt)).all()


def test_huge_weights_need_bfloat16_scales():
    w = torch.tensor([[1e8, -1.0]])
    with pytest.raises(UserError, match="bfloat16"):
        quantize_tensor(w, QuantScheme(bits=8))
    qt = quantize_tensor(w, QuantScheme(bits=8, scale_dtype="bfloat16"))
    assert ((w - qt.dequantize()).abs() <= theoretical_max_error(qt) * (1 + 1e-5)).all()


def test_per_row_clip_ratio():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    s = QuantScheme(bits=4, granularity="group", group_size=16)
    ratio = torch.tensor([[1.0], [0.5], [1.0]])
    clipped = quantize_tensor(w, s, ratio)
    full = quantize_tensor(w, s)
    assert torch.equal(clipped.scale[[0, 2]], full.scale[[0, 2]])
    assert (clipped.scale[1] < full.scale[1]).all()
    # a uniform per-row ratio is accepted for the one-scale "tensor" granularity
    t = QuantScheme(bits=4, granularity="tensor")
    assert torch.equal(
        quantize_tensor(w, t, torch.full((3, 1), 0.7)).scale, quantize_tensor(w, t, 0.7).scale
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(4), QuantScheme()), r"2-D weights.*\(4,\)"),
        ((torch.zeros(2, 3, 4), QuantScheme()), r"2-D weights"),
        (
            (torch.zeros(2, 48), QuantScheme(granularity="group", group_size=32)),
            "group_size 32 does not divide in_features 48",
        ),
        ((torch.tensor([[1.0, float("nan")]]), QuantScheme()), "NaN"),
        ((torch.ones(2, 4), QuantScheme(), 0.0), r"clip_ratio must be in \(0, 1\]"),
        ((torch.ones(2, 4), QuantScheme(), 1.5), r"clip_ratio must be in \(0, 1\]"),
        ((torch.ones(2, 4), QuantScheme(), torch.ones(3, 1)), r"shape \(2, 1\)"),
        (
            (torch.ones(2, 4), QuantScheme(granularity="tensor"), torch.tensor([[1.0], [0.5]])),
            "one clip ratio",
        ),
    ],
)
def test_bad_inputs_are_user_errors(args, match):
    with pytest.raises(UserError, match=match):
        quantize_tensor(*args)


def outlier_weight(out=8, inf=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inf, generator=gen)
    w[:, 0] *= 8  # outliers make clipping worthwhile at low bits
    return w, torch.randn(32, inf, generator=gen)


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=3),
        QuantScheme(bits=4, symmetric=False, scale_dtype="bfloat16"),
        QuantScheme(bits=2, granularity="group", group_size=16),
        QuantScheme(bits=4, granularity="tensor"),
        QuantScheme(bits=8),
    ],
)
@pytest.mark.parametrize("use_x", [True, False])
def test_clip_search_never_does_worse_than_no_clipping(scheme, use_x):
    w, x = outlier_weight()
    x = x if use_x else None
    ratio = search_clip_ratio(w, scheme, x, grid=10, min_ratio=0.4)
    assert ratio.shape == (8, 1) and (ratio >= 0.4).all() and (ratio <= 1).all()
    best = clip_objective(w, fake_quantize(w, scheme, ratio), x)
    base = clip_objective(w, fake_quantize(w, scheme, 1.0), x)
    if scheme.granularity == "tensor":
        assert (ratio == ratio[0]).all()
        best, base = best.sum(), base.sum()
    assert (best <= base * (1 + 1e-6)).all()
    if scheme.bits <= 3:
        assert (ratio < 1).any() and best.sum() < base.sum()


def test_clip_objective_by_hand():
    w = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    w_q = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert clip_objective(w, w_q).tolist() == [1.0, 1.0]
    x = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    assert clip_objective(w, w_q, x).tolist() == [9.0 + 4.0, 9.0 + 4.0]


def test_clip_search_bad_arguments():
    w = torch.ones(2, 4)
    with pytest.raises(UserError, match=r"shape \(n, 4\)"):
        search_clip_ratio(w, QuantScheme(), torch.ones(3, 5))
    with pytest.raises(UserError, match="min_ratio"):
        search_clip_ratio(w, QuantScheme(), min_ratio=0.0)
    with pytest.raises(UserError, match="grid"):
        search_clip_ratio(w, QuantScheme(), grid=0)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_integer_linear_with_quantized_bias_matches_float(granularity):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 48, generator=gen)
    w = torch.randn(12, 48, generator=gen) * 0.2
    b = torch.randn(12, generator=gen)
    s_in = x.abs().max() / 127
    x_q = torch.round(x / s_in).clamp(-127, 127).to(torch.int32)
    qt = quantize_tensor(w, QuantScheme(bits=8, granularity=granularity))
    s_w = qt.scale.expand(12, 1)
    b_q = quantize_bias(b, s_in, qt.scale)
    assert b_q.dtype == torch.int32 and b_q.shape == (12,)

    acc = x_q @ qt.codes.to(torch.int32).T + b_q  # int32 accumulate, int32 bias
    assert acc.dtype == torch.int32
    y = acc.float() * (s_in * s_w.T)
    y_ref = torch.nn.functional.linear(x, w, b)
    # |x w - x_q w_q| <= sum_k |x| dw + |w| dx + dx dw, plus the bias rounding S_in S_w / 2
    dx, dw = s_in / 2, s_w.T / 2
    bound = x.abs() @ torch.ones(48, 12) * dw + dx * w.abs().sum(1) + 48 * dx * dw + s_in * dw
    assert ((y - y_ref).abs() <= bound * 1.001 + 1e-5).all()
    assert (y - y_ref).abs().max() < 0.05


def test_quantize_bias_by_hand_and_errors():
    b_q = quantize_bias(torch.tensor([1.0, -0.26, 1e12]), 0.5, torch.tensor([[0.5], [0.1], [1.0]]))
    assert b_q.tolist() == [4, -5, 2**31 - 1]  # 1/0.25; -0.26/0.05 = -5.2; saturated
    with pytest.raises(UserError, match="group-wise"):
        quantize_bias(torch.zeros(2), 0.5, torch.ones(2, 4))
    with pytest.raises(UserError, match="one input scale"):
        quantize_bias(torch.zeros(2), torch.ones(2), torch.ones(2, 1))
