"""Architecture description of a decoder-only transformer (Llama and GPT-2 families)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError

ARCHS = ("llama", "gpt2")


@dataclass
class TransformerConfig:
    """Everything needed to build :class:`mlsyskit.models.transformer.Transformer`.

    ``arch="llama"``: RMSNorm, RoPE (``rope_theta``), grouped-query attention, SwiGLU; Qwen2-style
    checkpoints set ``attn_bias=True`` (bias on q/k/v only).
    ``arch="gpt2"``: LayerNorm with bias, learned positions, GELU (tanh), biases everywhere.
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    attn_bias: bool = False  # bias on the fused qkv projection
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    head_dim: int | None = None  # default dim // n_heads

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def gpt2(self) -> bool:
        return self.arch == "gpt2"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_config_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A Hugging Face ``config.json`` (or the directory holding it) as ``(file, object)``.

    One reader for every command that takes a model config, so a missing, unreadable or
    non-object file gives the same one-line :class:`UserError` everywhere.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"model config {p} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read model config {p}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a JSON object (a Hugging Face config.json)")
    return p, data
