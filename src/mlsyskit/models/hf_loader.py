"""Load a Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer.json).

Supports model_type llama, mistral, qwen2 (Llama family: q/k/v/o, gate/up/down, RMSNorm) and
gpt2 (Conv1D weights stored (in, out), transposed here). Weights are read with safetensors only:
never pickle. Maps HF names to ours (see :mod:`mlsyskit.models.checkpoint`), fusing q|k|v and
gate|up.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint_types import (
    PICKLE_SUFFIXES,
    Checkpoint,
    check_state_dict,
    check_tokenizer,
    pickle_message,
)
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.tokenizer import Tokenizer

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "gpt2")
# Buffers some checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    """An eos_token_id entry (int, list of ints or null) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta, refusing RoPE scaling our model does not implement.

    transformers >= 5 writes ``rope_parameters`` {"rope_type", "rope_theta", ...}; older
    configs have a top-level ``rope_theta`` and ``rope_scaling``.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind not in ("default", None):
            raise UserError(f"RoPE scaling type {kind!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_config(hf: dict[str, Any]) -> TransformerConfig:
    """Our TransformerConfig from a HF config.json dict (eos ids from config.json only)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        if model_type == "gpt2":
            return _gpt2_config(hf)
        return _llama_config(hf, model_type)
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc} (needed for a {model_type} model)") from exc
    except (TypeError, ValueError) as exc:  # e.g. "hidden_size": null
        raise UserError(f"config.json has an invalid value: {exc}") from exc


def _gpt2_config(hf: dict[str, Any]) -> TransformerConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # our GPT-2 uses the tanh GELU
        raise UserError(f"GPT-2 activation {act!r} is not supported (only gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise UserError("GPT-2 attention scaling variants are not supported")
    dim = int(hf["n_embd"])
    return TransformerConfig(
        arch="gpt2",
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["n_layer"]),
        n_heads=int(hf["n_head"]),
        n_kv_heads=int(hf["n_head"]),
        hidden_dim=int(hf.get("n_inner") or 4 * dim),
        max_seq_len=int(hf["n_positions"]),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_ids(hf.get("eos_token_id")),
    )


def _llama_config(hf: dict[str, Any], model_type: str) -> TransformerConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"activation {hf['hidden_act']!r} is not supported (only silu)")
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise UserError("Llama attention_bias/mlp_bias (o_proj or MLP biases) are not supported")
    max_seq_len = int(hf["max_position_embeddings"])
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window and window < max_seq_len:
        # Within the window sliding attention is full attention: cap the context there.
        max_seq_len = int(window)
    n_heads = int(hf["num_attention_heads"])
    return TransformerConfig(
        arch="llama",
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        hidden_dim=int(hf["intermediate_size"]),
        max_seq_len=max_seq_len,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_ids(hf.get("eos_token_id")),
        head_dim=hf.get("head_dim"),
    )


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir: the index's shards, else all *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise UserError(f"{path} lacks shard(s) listed in its index: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        raise UserError(pickle_message(pickled[0]) if pickled else f"{path} has no *.safetensors")
    return files


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read {file}: {exc}") from exc
    return tensors


def _strip(name: str) -> str:
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _to_ours(hf: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """Rename/fuse HF tensors into our state dict (consumes ``hf``)."""
    src = {_strip(k): v for k, v in hf.items() if not k.endswith(_IGNORED_SUFFIXES)}
    hf.clear()
    sd: dict[str, torch.Tensor] = {}

    def take(ours: str, theirs: str, transpose: bool = False) -> None:
        if theirs in src:
            t = src.pop(theirs)
            sd[ours] = t.t() if transpose else t

    def fuse(ours: str, theirs: list[str]) -> None:
        if all(t in src for t in theirs):
            parts = [src.pop(t) for t in theirs]
            if len({p.shape[1:] for p in parts}) != 1:
                raise UserError(f"tensors {', '.join(theirs)} have mismatched shapes")
            sd[ours] = torch.cat(parts)

    if cfg.gpt2:
        take("embed.weight", "wte.weight")
        take("pos_embed.weight", "wpe.weight")
        for i in range(cfg.n_layers):
            h, o = f"h.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                take(f"{o}attn_norm.{kind}", f"{h}ln_1.{kind}")
                take(f"{o}ffn_norm.{kind}", f"{h}ln_2.{kind}")
                # Conv1D keeps weights as (in, out): transpose to nn.Linear's (out, in)
                transpose = kind == "weight"
                take(f"{o}attn.qkv.{kind}", f"{h}attn.c_attn.{kind}", transpose)
                take(f"{o}attn.o_proj.{kind}", f"{h}attn.c_proj.{kind}", transpose)
                take(f"{o}ffn.up.{kind}", f"{h}mlp.c_fc.{kind}", transpose)
                take(f"{o}ffn.down.{kind}", f"{h}mlp.c_proj.{kind}", transpose)
        take("norm.weight", "ln_f.weight")
        take("norm.bias", "ln_f.bias")
    else:
        take("embed.weight", "embed_tokens.weight")
        for i in range(cfg.n_layers):
            h, o = f"layers.{i}.", f"layers.{i}."
            take(f"{o}attn_norm.weight", f"{h}input_layernorm.weight")
            take(f"{o}ffn_norm.weight", f"{h}post_attention_layernorm.weight")
            for kind in ("weight", "bias"):
                fuse(f"{o}attn.qkv.{kind}", [f"{h}self_attn.{x}_proj.{kind}" for x in "qkv"])
            take(f"{o}attn.o_proj.weight", f"{h}self_attn.o_proj.weight")
            fuse(f"{o}ffn.gate_up.weight", [f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"])
            take(f"{o}ffn.down.weight", f"{h}mlp.down_proj.weight")
        take("norm.weight", "norm.weight")
    if cfg.tie_embeddings:
        src.pop("lm_head.weight", None)  # some checkpoints store the tied copy as well
    else:
        take("lm_head.weight", "lm_head.weight")
    sd.update(src)  # leftovers: check_state_dict reports them as unexpected
    return sd


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a HF checkpoint directory: config, state dict (our names, ``dtype``), tokenizer."""
    hf = _read_json(path / "config.json")
    cfg = hf_config(hf)
    gen = path / "generation_config.json"
    if gen.is_file():
        more = _ids(_read_json(gen).get("eos_token_id"))
        cfg.eos_token_ids = list(dict.fromkeys(cfg.eos_token_ids + more))
    tokenizer = Tokenizer.from_hf_dir(path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
    cfg.bos_token_id, cfg.eos_token_ids = tokenizer.bos_id, list(tokenizer.eos_ids)

    files = weight_files(path)
    raw = _read_tensors(files)
    stored = Counter(t.dtype for t in raw.values() if t.is_floating_point())
    main_dtype = stored.most_common(1)[0][0] if stored else torch.float32
    sd = _to_ours(raw, cfg)
    check_state_dict(sd, cfg, path)
    check_tokenizer(tokenizer, cfg, path)
    return Checkpoint(
        config=cfg,
        state_dict={k: v.to(dtype).contiguous() for k, v in sd.items()},
        tokenizer=tokenizer,
        source=str(path),
        file_type=f"safetensors-{_DTYPE_NAMES.get(main_dtype, str(main_dtype).split('.')[-1])}",
        original_bytes=sum(f.stat().st_size for f in files),
    )
