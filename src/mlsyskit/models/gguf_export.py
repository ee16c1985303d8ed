"""Write a model as a GGUF file llama.cpp reads: the inverse of :mod:`mlsyskit.models.gguf_loader`.

Our fused tensors are split back into llama.cpp's (q | k | v, gate | up), the Q/K rows of the
llama architecture are permuted the way ``convert_hf_to_gguf.py`` permutes them, and the
config and tokenizer go into the metadata llama.cpp expects (``llama.*``/``qwen2.*``/``gpt2.*``
hyper-parameters; ``tokenizer.ggml.*``: byte-level BPE tokens, types, merges, special ids,
chat template). Written with gguf-py's ``GGUFWriter``.

A tensor is a float array (written as F32 or F16) or a :class:`RawBlocks` of a GGML block
format (e.g. Q4_1 blocks a quantizer made), whose rows are reordered and split without
touching a byte. Arrays are in our row order; the permutation happens here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.gguf_loader import GGUFFile, _plan, _unpermute_index
from mlsyskit.models.tokenizer import Tokenizer

Q = GGMLQuantizationType
FLOAT_TYPES = {"f32": Q.F32, "f16": Q.F16}
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class RawBlocks:
    """A 2-D weight already in a GGML block format: ``data`` (rows, row_bytes) uint8, in our
    row order; ``cols`` values per row."""

    qtype: GGMLQuantizationType
    data: np.ndarray
    cols: int

    def __post_init__(self) -> None:
        block, nbytes = GGML_QUANT_SIZES[self.qtype]
        if self.cols % block or self.data.shape[1] != self.cols // block * nbytes:
            raise ValueError(f"{self.qtype.name} rows of {self.cols} values take {self.cols // block * nbytes} bytes")


def gguf_arch(cfg: TransformerConfig) -> str:
    """llama.cpp's architecture name: gpt2, qwen2 (llama layout with a qkv bias) or llama."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen2" if cfg.attn_bias else "llama"


def _part_rows(cfg: TransformerConfig, gguf_name: str, total: int) -> int:
    """Rows of one part of a fused tensor (attn_q/k/v, ffn_gate/up), or all ``total``."""
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    hd = cfg.head_dim or cfg.dim // cfg.n_heads
    return {
        "attn_q": cfg.n_heads * hd,
        "attn_k": cfg.n_kv_heads * hd,
        "attn_v": cfg.n_kv_heads * hd,
        "ffn_gate": cfg.hidden_dim,
        "ffn_up": cfg.hidden_dim if cfg.arch != "gpt2" else total,
    }.get(kind, total)


def _rows(t: np.ndarray | RawBlocks, index: np.ndarray | slice) -> np.ndarray | RawBlocks:
    if isinstance(t, RawBlocks):
        return RawBlocks(t.qtype, np.ascontiguousarray(t.data[index]), t.cols)
    return np.ascontiguousarray(t[index])


def gguf_tensors(
    cfg: TransformerConfig, tensors: dict[str, Any]
) -> dict[str, np.ndarray | RawBlocks]:
    """Our state dict (float tensors/arrays or :class:`RawBlocks`) as llama.cpp's tensors:
    split, Q/K-permuted (llama), in llama.cpp's names. Unknown names are an error."""
    plan = _plan(cfg, gguf_arch(cfg))
    out: dict[str, np.ndarray | RawBlocks] = {}
    for ours, value in tensors.items():
        if ours not in plan:
            raise UserError(f"cannot write tensor {ours!r} to GGUF (no llama.cpp name for it)")
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        total = value.data.shape[0] if isinstance(value, RawBlocks) else value.shape[0]
        start = 0
        for name, heads in plan[ours]:
            n = _part_rows(cfg, name, total) if len(plan[ours]) > 1 else total
            part = _rows(value, slice(start, start + n))
            if heads is not None:  # the loader takes stored rows ``index``: invert it
                part = _rows(part, np.argsort(_unpermute_index(n, heads, name)))
            out[name] = part
            start += n
        if start != total:
            raise UserError(f"tensor {ours} has {total} rows, its parts {start}")
    return out


# -- tokenizer metadata -----------------------------------------------------------------------


def _pre_name(pre_tokenizer: Any) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer (its JSON form)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from mlsyskit.models.tokenizer import _byte_level_pre_tokenizer

    for name in ("smollm", "llama-bpe", "qwen2"):
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = _byte_level_pre_tokenizer(name)
        if json.loads(probe.to_str())["pre_tokenizer"] == pre_tokenizer:
            return name
    return "gpt-2"


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, source: str | None = None) -> dict[str, Any]:
    """``tokenizer.*`` metadata: copied from ``source`` when it is a GGUF file, else built from
    the tokenizer (byte-level BPE only): tokens by id (padded with unused ``[PAD<i>]`` tokens
    up to ``vocab_size``), their types (special added tokens are control tokens), merges."""
    if source is not None and Path(source).is_file():
        meta = GGUFFile(Path(source)).metadata
        return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    j = json.loads(tokenizer._tk.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"only byte-level BPE tokenizers can be written to GGUF, not {model.get('type')!r}")
    n = max(vocab_size, tokenizer.vocab_size)
    tokens: list[str | None] = [None] * n
    types = [NORMAL] * n
    for tok, i in model["vocab"].items():
        tokens[i] = tok
    for a in j.get("added_tokens") or []:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(j.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos),
    }
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = int(tokenizer.bos_id)
    if tokenizer.eos_ids:
        meta["tokenizer.ggml.eos_token_id"] = int(tokenizer.eos_ids[0])
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _add_metadata(w: GGUFWriter, meta: dict[str, Any]) -> None:
    """Typed as llama.cpp reads them: ids u32, flags bool, token types i32, text strings."""
    for key, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, list):
            w.add_array(key, v)
        else:
            raise UserError(f"cannot write metadata {key} of type {type(v).__name__}")


# -- the file ---------------------------------------------------------------------------------


def write_gguf(
    out: str | Path,
    cfg: TransformerConfig,
    tensors: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    float_type: str = "f32",
    gguf_named: bool = False,
    source: str | None = None,
    file_type: LlamaFileType | None = None,
    name: str = "mlsyskit export",
) -> Path:
    """Write ``tensors`` (our names: float tensors, or :class:`RawBlocks`) of a model with
    config ``cfg`` as a GGUF file at ``out``; float 2-D weights as ``float_type`` ("f32" or
    "f16"), 1-D tensors (norms, biases) always F32 as llama.cpp wants; with ``gguf_named`` the
    tensors are already llama.cpp's (names, split, row order). ``source``: a GGUF file whose
    tokenizer metadata is copied. The file is written under a temporary name and renamed when
    complete. Returns the path."""
    if float_type not in FLOAT_TYPES:
        raise UserError(f"float type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    arch = gguf_arch(cfg)
    out = Path(out).expanduser().absolute()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    w = GGUFWriter(tmp, arch)
    w.add_name(name)
    hd = cfg.head_dim or cfg.dim // cfg.n_heads
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(hd)
        if hd != cfg.dim // cfg.n_heads:
            w.add_key_length(hd)
            w.add_value_length(hd)
    if file_type is None:
        file_type = LlamaFileType.ALL_F32 if float_type == "f32" else LlamaFileType.MOSTLY_F16
    w.add_file_type(int(file_type))
    _add_metadata(w, tokenizer_metadata(tokenizer, cfg.vocab_size, source))
    for gname, t in (tensors if gguf_named else gguf_tensors(cfg, tensors)).items():
        if isinstance(t, torch.Tensor):
            t = t.detach().float().cpu().numpy()
        if isinstance(t, RawBlocks):
            w.add_tensor(gname, t.data, raw_dtype=t.qtype)
        elif t.ndim == 2 and float_type == "f16":
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, t.astype(np.float32))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out
