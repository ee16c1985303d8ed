import math

import pytest
import torch
import torch.nn.functional as F

from mlsyskit.errors import UserError
from mlsyskit.models import (
    Attention,
    Block,
    CharTransformer,
    FeedForward,
    RMSNorm,
    apply_rope,
    build_model,
    rope_cache,
)


def test_rmsnorm_matches_formula() -> None:
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 4, 16)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_matches_rotation_formula() -> None:
    d, T, theta = 8, 6, 500.0
    cos, sin = rope_cache(d, T, theta)
    assert cos.shape == sin.shape == (T, d)
    x = torch.randn(2, 3, T, d)
    out = apply_rope(x, cos, sin)
    expected = torch.empty_like(x)
    half = d // 2
    for p in range(T):
        for i in range(half):
            a = p * theta ** (-2 * i / d)
            x1, x2 = x[..., p, i], x[..., p, i + half]
            expected[..., p, i] = x1 * math.cos(a) - x2 * math.sin(a)
            expected[..., p, i + half] = x1 * math.sin(a) + x2 * math.cos(a)
    torch.testing.assert_close(out, expected)


def test_rope_scores_depend_on_relative_position_only() -> None:
    d = 16
    cos, sin = rope_cache(d, 32)
    q, k = torch.randn(d), torch.randn(d)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(0, 0), q @ k)


def test_rope_rejects_odd_head_dim() -> None:
    with pytest.raises(UserError, match="even head_dim"):
        rope_cache(7, 4)


def _manual_attention(q, k, v):  # (B, H, T, D)
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("use_rope", [False, True])
def test_gqa_matches_expanded_kv_heads(use_rope: bool) -> None:
    dim, nh, nkv, hd, B, T = 32, 8, 2, 4, 2, 7
    gqa = Attention(dim, nh, nkv, qkv_fused=False)
    mha = Attention(dim, nh, nh, qkv_fused=False)
    rep = nh // nkv
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.reshape(nkv, hd, dim)
            getattr(mha, name).weight.copy_(w.repeat_interleave(rep, dim=0).reshape(nh * hd, dim))
    rope = rope_cache(hd, T) if use_rope else None
    x = torch.randn(B, T, dim)
    torch.testing.assert_close(gqa(x, rope), mha(x, rope))

    # and both equal explicit softmax attention with k/v heads expanded by hand
    q = gqa.q_proj(x).reshape(B, T, nh, hd).transpose(1, 2)
    k = gqa.k_proj(x).reshape(B, T, nkv, hd).transpose(1, 2)
    v = gqa.v_proj(x).reshape(B, T, nkv, hd).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = torch.stack([k[:, h // rep] for h in range(nh)], dim=1)
    v = torch.stack([v[:, h // rep] for h in range(nh)], dim=1)
    y = _manual_attention(q, k, v).transpose(1, 2).reshape(B, T, nh * hd)
    torch.testing.assert_close(gqa(x, rope), gqa.o_proj(y))


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_fused_qkv_matches_separate(n_kv_heads: int | None) -> None:
    fused = Attention(24, 4, n_kv_heads, bias=True, qkv_fused=True)
    split = Attention(24, 4, n_kv_heads, bias=True, qkv_fused=False)
    with torch.no_grad():
        sizes = [split.q_proj.out_features, split.k_proj.out_features, split.v_proj.out_features]
        for part, w, b in zip(
            (split.q_proj, split.k_proj, split.v_proj),
            fused.qkv.weight.split(sizes),
            fused.qkv.bias.split(sizes),
            strict=True,
        ):
            part.weight.copy_(w)
            part.bias.copy_(b)
        split.o_proj.load_state_dict(fused.o_proj.state_dict())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(fused(x), split(x))


def test_feedforward_variants() -> None:
    x = torch.randn(2, 3, 8)
    ff = FeedForward(8, 16, "swiglu")
    w_gate, w_up = ff.gate_up.weight.chunk(2, dim=0)  # rows [gate | up]
    expected = ff.down(F.silu(x @ w_gate.t()) * (x @ w_up.t()))
    torch.testing.assert_close(ff(x), expected)
    gelu = FeedForward(8, 16, "gelu_tanh", bias=True)
    torch.testing.assert_close(gelu(x), gelu.down(F.gelu(gelu.up(x), approximate="tanh")))
    with pytest.raises(UserError, match="unknown activation"):
        FeedForward(8, 16, "relu6")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "layernorm", "ffn": "gelu", "bias": True, "qkv_fused": True},
        {"n_kv_heads": 1, "norm": "rmsnorm", "ffn": "swiglu", "hidden": 40, "qkv_fused": False},
    ],
)
def test_block_is_causal_prenorm_residual(kwargs: dict) -> None:
    block = Block(16, 4, **kwargs)
    x = torch.randn(2, 6, 16)
    out = block(x)
    assert out.shape == x.shape
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(block(x2)[:, :4], out[:, :4])
    h = x + block.attn(block.attn_norm(x))
    torch.testing.assert_close(out, h + block.ffn(block.ffn_norm(h)))


def test_bad_attention_config() -> None:
    with pytest.raises(UserError, match="multiple of n_kv_heads"):
        Attention(32, 4, 3)
    with pytest.raises(UserError, match="not divisible"):
        Attention(30, 4)
    with pytest.raises(UserError, match="unknown norm"):
        Block(16, 4, norm="batchnorm")


@pytest.mark.parametrize(
    "model",
    [
        lambda: build_model("transformer", vocab_size=17, seq_len=10),
        lambda: CharTransformer(
            17, 10, dim=32, n_heads=4, n_kv_heads=2, norm="rmsnorm", ffn="swiglu", pos="rope"
        ),
    ],
    ids=["default", "llama-style"],
)
def test_transformer_is_causal(model) -> None:
    m = model()
    idx = torch.randint(0, 17, (2, 10))
    out = m(idx)
    for t in (0, 4, 9):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 17
        out2 = m(changed)
        torch.testing.assert_close(out2[:, :t], out[:, :t])
        assert not torch.allclose(out2[:, t], out[:, t])
