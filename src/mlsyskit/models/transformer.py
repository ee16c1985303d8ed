"""Decoder-only transformer for real checkpoints: Llama family (RMSNorm, RoPE, GQA, SwiGLU;
SmolLM2, TinyLlama, Qwen2 with q/k/v bias) and GPT-2 family (LayerNorm, learned positions,
fused QKV, GELU), built from the same :mod:`mlsyskit.models.blocks` and configured by
:class:`~mlsyskit.models.config.TransformerConfig`.

Two ways to run it:

- ``model(input_ids)`` with ``input_ids`` of shape ``(B, T)``: plain causal forward over whole
  sequences starting at position 0 (no cache); returns logits ``(B, T, vocab)``. The naive
  ``kv_cache=False`` engine mode and perplexity evaluation use this.
- ``model.forward_tokens(input_ids, positions, kv)``: the engine's path. ``input_ids`` and
  ``positions`` are ``(T,)``: the new tokens of many sequences laid end to end; ``kv`` stores
  their keys/values in the paged cache and attends over each sequence's context. Returns hidden
  states ``(T, dim)``; :meth:`logits` projects only the rows that need sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.blocks import Block, KVCache, make_norm, rope_cache, signed_sin
from mlsyskit.models.config import TransformerConfig

# (quantized weight, bias or None) -> the layer that computes with it
LinearFactory = Callable[[Any, Tensor | None], nn.Module]


class RowEmbedding(nn.Module):
    """Token embedding served by a quantized layer's rows: ``layer.rows(ids)`` dequantizes only
    the rows looked up (e.g. GGUF's Q8_0 table, which is also the tied output projection)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, ids: Tensor) -> Tensor:
        return self.layer.rows(ids.reshape(-1)).view(*ids.shape, -1)


class StepKV(Protocol):
    """Per-step paged-cache view: hands each layer its :class:`KVCache`."""

    def layer(self, i: int) -> KVCache: ...


class Transformer(nn.Module):
    """A Llama- or GPT-2-style decoder; parameter names are those of ``engine.checkpoint``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gpt2 = cfg.gpt2
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        if gpt2:
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(
            Block(
                cfg.dim,
                cfg.n_heads,
                cfg.n_kv_heads,
                hidden=cfg.hidden_dim,
                norm="layernorm" if gpt2 else "rmsnorm",
                ffn="gelu_tanh" if gpt2 else "swiglu",
                bias=gpt2,
                qkv_bias=gpt2 or cfg.attn_bias,
                eps=cfg.norm_eps,
                qkv_fused=True,
                head_dim=cfg.head_dim,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = make_norm("layernorm" if gpt2 else "rmsnorm", cfg.dim, eps=cfg.norm_eps, bias=gpt2)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if not gpt2:  # real tables even when the layers are built on the meta device
            cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device="cpu")
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            self.register_buffer("rope_sin_signed", signed_sin(sin), persistent=False)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and vocabulary projection of hidden states ``(..., dim)``."""
        h = self.norm(hidden)
        if "lm_head" in self._modules:  # untied, or a quantized copy of the tied embedding
            return self.lm_head(h)
        return h @ self.embed.weight.t()

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(input_ids)
        if self.cfg.gpt2:
            x = x + self.pos_embed(positions)
        return x

    def _check_len(self, n: int) -> None:
        if n > self.cfg.max_seq_len:
            raise UserError(f"sequence of {n} tokens exceeds the model's context of {self.cfg.max_seq_len}")

    def forward(self, input_ids: Tensor) -> Tensor:
        """Causal forward over ``(B, T)`` token ids at positions ``0..T-1``; logits ``(B, T, V)``."""
        T = input_ids.shape[1]
        self._check_len(T)
        pos = torch.arange(T, device=input_ids.device)
        x = self._embed(input_ids, pos)
        rope = None if self.cfg.gpt2 else (self.rope_cos[:T], self.rope_sin[:T])
        for layer in self.layers:
            x = layer(x, rope)
        return self.logits(x)

    def forward_tokens(self, input_ids: Tensor, positions: Tensor, kv: StepKV) -> Tensor:
        """Hidden states ``(T, dim)`` for flat tokens at the given positions, through the cache."""
        return self.forward_hidden(self._embed(input_ids, positions), positions, kv)

    def forward_hidden(self, x: Tensor, positions: Tensor, kv: StepKV) -> Tensor:
        """:meth:`forward_tokens` from hidden states ``x`` ``(T, dim)`` instead of token ids: a
        pipeline stage's layers (``kv.layer(i)`` is this model's ``i``-th layer)."""
        rope = None
        if not self.cfg.gpt2:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin_signed[positions].unsqueeze(1))
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, kv.layer(i))
        return x


@contextmanager
def _skip_init() -> Iterator[None]:
    """Layers built inside skip their random init (the checkpoint replaces every value), as
    transformers' ``no_init_weights`` does. On the meta device the init would only cost time:
    its first call imports torch._dynamo (~1 s, several on a busy machine)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def build_transformer(
    cfg: TransformerConfig,
    state_dict: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    quantized_linear: LinearFactory | None = None,
) -> Transformer:
    """Build the model (on the meta device when weights are given, so nothing is allocated twice)
    and load ``state_dict`` with strict name and shape checks.

    Values that are not tensors (quantized weights, e.g. :class:`mlsyskit.quant.QuantizedTensor`)
    become ``quantized_linear(weight, bias)`` layers (e.g. :class:`mlsyskit.quant.QuantLinear`,
    which holds only the integer codes); see :func:`attach_linear_weights`.
    """
    if state_dict is None:
        return Transformer(cfg).to(dtype).eval()
    plain = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    quantized = {k: v for k, v in state_dict.items() if not isinstance(v, Tensor)}
    with torch.device("meta"), _skip_init():
        model = Transformer(cfg)
    try:
        missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch: say which tensor, in one line
        raise UserError(f"checkpoint does not match its config: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in quantized]
    names = model.state_dict().keys()
    unexpected = list(unexpected) + [k for k in quantized if k != "lm_head.weight" and k not in names]
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match the {cfg.arch} architecture: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if quantized:
        if quantized_linear is None:
            raise UserError(
                "the checkpoint holds quantized weights: pass quantized_linear=QuantLinear "
                "(mlsyskit.quant) to build_transformer"
            )
        attach_linear_weights(model, quantized, quantized_linear)
    return model.to(dtype).eval()


def attach_linear_weights(model: nn.Module, weights: dict[str, Any], make_linear: LinearFactory) -> nn.Module:
    """Replace the linear layer each ``"<module path>.weight"`` names by ``make_linear(weight,
    bias)``, keeping the layer's bias; ``lm_head.weight`` on a tied model creates the head.
    Each weight must have a ``shape`` equal to the layer's (out, in).

    A quantized ``embed.weight`` becomes a :class:`RowEmbedding` over ``make_linear(weight,
    None)`` (which must have ``rows(ids)``); on a tied model without its own ``lm_head.weight``
    that same layer is the output projection, so the table is stored once."""
    for name, w in weights.items():
        if name == "embed.weight":
            if tuple(w.shape) != tuple(model.embed.weight.shape):
                raise UserError(f"quantized tensor {name} has shape {tuple(w.shape)}, the embedding {tuple(model.embed.weight.shape)}")
            layer = make_linear(w, None)
            model.embed = RowEmbedding(layer)
            if getattr(model.cfg, "tie_embeddings", False) and "lm_head.weight" not in weights:
                model.lm_head = layer
            continue
        path = name.removesuffix(".weight")
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if old is not None and not isinstance(old, nn.Linear):
            raise UserError(f"quantized tensor {name} does not belong to a linear layer")
        if old is not None and tuple(old.weight.shape) != tuple(w.shape):
            raise UserError(f"quantized tensor {name} has shape {tuple(w.shape)}, the layer {tuple(old.weight.shape)}")
        bias = None if old is None or old.bias is None else old.bias
        setattr(parent, child, make_linear(w, bias))
    return model
