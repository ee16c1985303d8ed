"""What a loaded checkpoint holds, and the checks every loader applies to it.

Our state-dict names are listed in :mod:`mlsyskit.models.checkpoint`. This module imports no
loader, so the loaders and :func:`~mlsyskit.models.checkpoint.load_checkpoint` can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    """A loaded checkpoint, ready to build :class:`mlsyskit.models.transformer.Transformer`."""

    config: TransformerConfig
    state_dict: dict[str, Any]  # our names: tensors in the requested dtype, or quantized weights
    tokenizer: Tokenizer
    source: str  # resolved path of the file or directory
    file_type: str  # "Q4_1", "F16", ... for GGUF; "safetensors-bf16", ... for HF
    original_bytes: int  # size of the weight file(s) on disk


def pickle_message(name: str) -> str:
    """Why a pickled weight file ``name`` is refused, and what to do instead."""
    return (
        f"{name} is a pickled PyTorch checkpoint, which mlsyskit never loads (unpickling can run "
        "arbitrary code); convert it to safetensors (model.save_pretrained(dir, "
        "safe_serialization=True)) or use a .gguf file"
    )


def expected_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of our state dict for ``cfg`` with its shape."""
    hd = cfg.head_dim or cfg.dim // cfg.n_heads
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    norm = {"weight": (cfg.dim,), "bias": (cfg.dim,)} if cfg.gpt2 else {"weight": (cfg.dim,)}
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, cfg.dim)}
    if cfg.gpt2:
        shapes["pos_embed.weight"] = (cfg.max_seq_len, cfg.dim)
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        for suffix, shape in norm.items():
            shapes[f"{pre}attn_norm.{suffix}"] = shape
            shapes[f"{pre}ffn_norm.{suffix}"] = shape
        shapes[f"{pre}attn.qkv.weight"] = (qkv, cfg.dim)
        shapes[f"{pre}attn.o_proj.weight"] = (cfg.dim, cfg.n_heads * hd)
        if cfg.gpt2:
            shapes[f"{pre}attn.qkv.bias"] = (qkv,)
            shapes[f"{pre}attn.o_proj.bias"] = (cfg.dim,)
            shapes[f"{pre}ffn.up.weight"] = (cfg.hidden_dim, cfg.dim)
            shapes[f"{pre}ffn.up.bias"] = (cfg.hidden_dim,)
            shapes[f"{pre}ffn.down.weight"] = (cfg.dim, cfg.hidden_dim)
            shapes[f"{pre}ffn.down.bias"] = (cfg.dim,)
        else:
            if cfg.attn_bias:
                shapes[f"{pre}attn.qkv.bias"] = (qkv,)
            shapes[f"{pre}ffn.gate_up.weight"] = (2 * cfg.hidden_dim, cfg.dim)
            shapes[f"{pre}ffn.down.weight"] = (cfg.dim, cfg.hidden_dim)
    for suffix, shape in norm.items():
        shapes[f"norm.{suffix}"] = shape
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def check_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: TransformerConfig, source: str | Path
) -> None:
    """Raise UserError unless ``state_dict`` has exactly the tensors and shapes ``cfg`` needs."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    problems = [f"missing {_few(missing)}"] if missing else []
    if extra:
        problems.append(f"unexpected {_few(extra)}")
    if problems:
        raise UserError(f"{source}: tensors do not match the config ({'; '.join(problems)})")
    for name, shape in want.items():
        if tuple(state_dict[name].shape) != shape:
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                f"the config implies {shape}"
            )


def check_tokenizer(tokenizer: Tokenizer, cfg: TransformerConfig, source: str | Path) -> None:
    """Raise UserError if the tokenizer can produce ids the embedding table does not have.

    (A larger embedding table than the vocabulary is fine: checkpoints often pad it.)
    """
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} embeddings"
        )


def _few(names: list[str], n: int = 4) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
