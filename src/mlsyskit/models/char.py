"""Next-character models: int64 ``(B, T)`` in, logits ``(B, T, vocab_size)`` out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.blocks import Block, init_gpt_weights, make_norm, rope_cache


class CharLSTM(nn.Module):
    """McMahan's Shakespeare model: 8-dim embedding, 2-layer LSTM(256), linear to vocab.

    ``supports_vmap`` is False: ``nn.LSTM`` has no vmap batching rule. On CPU vmap falls
    back to a per-sample loop (correct, slow, warns); on CUDA with cuDNN any ``torch.func``
    transform over it raises ("Cannot access data pointer of Tensor that doesn't have
    storage"), so train it with plain autograd.
    """

    supports_vmap: bool = False

    def __init__(
        self, vocab_size: int, embed_dim: int = 8, hidden: int = 256, n_layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)


class CharTransformer(nn.Module):
    """Small causal pre-norm character transformer built from :class:`Block`.

    ``pos="learned"`` adds learned absolute positions (GPT-2 style, up to ``seq_len``);
    ``pos="rope"`` uses rotary embeddings in attention instead (Llama style).
    """

    supports_vmap: bool = True

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 80,
        *,
        dim: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        norm: str = "layernorm",
        ffn: str = "gelu",
        pos: str = "learned",
        rope_theta: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if pos not in ("learned", "rope"):
            raise UserError(f"unknown position scheme {pos!r}; use 'learned' or 'rope'")
        self.seq_len = seq_len
        self.pos = pos
        self.tok_emb = nn.Embedding(vocab_size, dim)
        if pos == "learned":
            self.pos_emb = nn.Embedding(seq_len, dim)
        else:
            cos, sin = rope_cache(dim // n_heads, seq_len, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, norm=norm, ffn=ffn, bias=bias) for _ in range(n_layers)
        )
        self.norm = make_norm(norm, dim, bias=bias)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        init_gpt_weights(self, n_layers)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.seq_len:
            raise UserError(
                f"sequence length {T} exceeds the model's seq_len={self.seq_len}; "
                f"build the model with seq_len>={T}"
            )
        x = self.tok_emb(idx)
        rope = None
        if self.pos == "learned":
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))
