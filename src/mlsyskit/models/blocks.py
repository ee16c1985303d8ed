"""Generic transformer building blocks (nanoGPT style), configurable for GPT-2 and Llama families.

- GPT-2: ``Block(dim, n_heads, norm="layernorm", ffn="gelu_tanh", bias=True, qkv_fused=True)``
  with learned absolute positions.
- Llama: ``Block(dim, n_heads, n_kv_heads, hidden=..., norm="rmsnorm", ffn="swiglu",
  bias=False, qkv_fused=False)`` with ``rope_cache(head_dim, max_pos, theta)`` passed to
  ``forward(x, rope=...)``.

Attention is always causal and uses ``F.scaled_dot_product_attention(is_causal=True)``; the
inference engine plugs its paged KV cache in through the ``cache`` argument. There is no dropout.
Everything here works under ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsyskit.errors import UserError

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")

Rope = tuple[Tensor, Tensor]


class KVCache(Protocol):
    """What the inference engine passes to one layer's attention (see mlsyskit.engine.attention)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store ``k``/``v`` ``(T, n_kv_heads, head_dim)`` and return ``(T, n_heads, head_dim)``."""
        ...


def rope_cache(
    head_dim: int,
    max_pos: int,
    theta: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Rope:
    """Rotary embedding tables ``(cos, sin)``, each of shape ``(max_pos, head_dim)``.

    Uses the "rotate half" (GPT-NeoX / Hugging Face Llama) layout: dimension ``i`` and
    ``i + head_dim // 2`` form a pair rotated by angle ``pos * theta ** (-2 i / head_dim)``.
    """
    if head_dim <= 0 or head_dim % 2:
        raise UserError(f"RoPE needs an even head_dim, got {head_dim}; pick dim/n_heads even")
    if max_pos <= 0:
        raise UserError(f"RoPE max_pos must be positive, got {max_pos}")
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    pos = torch.arange(max_pos, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (max_pos, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape ``(..., T, head_dim)`` by tables ``cos``/``sin`` of shape ``(T, head_dim)``."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def apply_rope_signed(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """:func:`apply_rope` in 3 ops: ``rotate_half(x) = roll(x, head_dim/2) * [-1.., +1..]``, with
    the signs folded into ``sin_signed`` (``sin`` whose first half is negated)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def signed_sin(sin: Tensor) -> Tensor:
    """``sin`` with the first half of its last dimension negated (for :func:`apply_rope_signed`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x**2) + eps) * weight`` (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # one fused op (F.rms_norm) instead of five: this runs twice per layer per decode step
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``"layernorm"`` (with or without bias) or ``"rmsnorm"``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise UserError(f"unknown norm {kind!r}; use one of {', '.join(NORMS)}")


class Attention(nn.Module):
    """Causal multi-head self-attention with optional grouped-query heads and RoPE.

    Parameters are ``qkv`` (fused, layout ``[q | k | v]``) or ``q_proj``/``k_proj``/``v_proj``,
    and ``o_proj``. With ``n_kv_heads < n_heads`` each k/v head serves ``n_heads // n_kv_heads``
    consecutive query heads (same grouping as Llama's ``repeat_kv``).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = False,
        qkv_fused: bool = True,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        qkv_bias = bias if qkv_bias is None else qkv_bias
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise UserError(
                f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}"
            )
        if head_dim is None:
            if dim % n_heads:
                raise UserError(f"dim={dim} is not divisible by n_heads={n_heads}")
            head_dim = dim // n_heads
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.qkv_fused = qkv_fused
        q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
        if qkv_fused:
            self.qkv = nn.Linear(dim, q_out + 2 * kv_out, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, q_out, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_out, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, dim, bias=bias)

    def forward(self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None) -> Tensor:
        """``x``: ``(B, T, dim)``; ``rope``: optional ``(cos, sin)`` for positions ``0..T-1``.

        With ``cache`` (the inference engine's path) ``x`` is ``(T, dim)``: the tokens of many
        sequences laid end to end, ``rope`` is ``(cos, sin_signed)`` with one ``(T, 1, head_dim)``
        row per token and the first half of ``sin_signed`` negated (see :func:`apply_rope_signed`),
        and ``cache.attend`` stores k/v and attends over each sequence's cached context.
        """
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        if cache is not None:
            return self._forward_cached(x, rope, cache)
        if self.qkv_fused:
            q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        B, T = x.shape[0], x.shape[1]
        q = q.reshape(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.reshape(B, T, nkv, hd).transpose(1, 2)
        v = v.reshape(B, T, nkv, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y)

    def _forward_cached(self, x: Tensor, rope: Rope | None, cache: KVCache) -> Tensor:
        T, hd, nh, nkv = x.shape[0], self.head_dim, self.n_heads, self.n_kv_heads
        if self.qkv_fused:
            qkv = self.qkv(x)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        qk = qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd)  # q and k heads side by side
        if rope is not None:  # one rotation for q and k together: fewer ops per decode step
            qk = apply_rope_signed(qk, *rope)
        v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
        y = cache.attend(qk[:, :nh], qk[:, nh:], v)
        return self.o_proj(y.reshape(T, nh * hd))


class FeedForward(nn.Module):
    """MLP: ``down(act(up(x)))`` for GELU, ``down(silu(gate(x)) * up(x))`` for SwiGLU
    (gate and up fused in one ``gate_up`` linear)."""

    def __init__(
        self, dim: int, hidden: int, activation: str = "gelu", *, bias: bool = False
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(
                f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )
        self.activation = activation
        if activation == "swiglu":  # one matmul for gate and up: rows [gate | up]
            self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.down(F.gelu(self.up(x), approximate=approximate))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        hidden: int | None = None,
        norm: str = "layernorm",
        ffn: str = "gelu",
        bias: bool = False,
        eps: float = 1e-5,
        qkv_fused: bool = True,
        qkv_bias: bool | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        self.attn_norm = make_norm(norm, dim, eps=eps, bias=bias)
        self.attn = Attention(
            dim, n_heads, n_kv_heads, bias=bias, qkv_fused=qkv_fused, qkv_bias=qkv_bias, head_dim=head_dim
        )
        self.ffn_norm = make_norm(norm, dim, eps=eps, bias=bias)
        self.ffn = FeedForward(dim, hidden, ffn, bias=bias)

    def forward(self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.ffn(self.ffn_norm(x))


def init_gpt_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 init: N(0, std) for linears/embeddings, zero biases, residual outputs scaled
    by ``1/sqrt(2 * n_layers)``. Deterministic under ``torch.manual_seed``."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down")) else std
            nn.init.normal_(m.weight, mean=0.0, std=s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
