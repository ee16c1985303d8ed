"""Perplexity over a long text with fixed context windows, and the size of a model's weights.

The text's token ids are cut into windows of ``window`` tokens whose starts are ``stride``
tokens apart (the last window ends at the last token), as in Hugging Face's perplexity guide:

- ``stride == window`` (the default): non-overlapping windows, every token predicted from the
  tokens before it *in its window* (the first token of each window has no context and is not
  scored);
- ``stride < window``: overlapping windows; each window scores only the tokens the previous
  window did not score (its last ``stride`` tokens), so every such token sees at least
  ``window - stride`` tokens of context. Smaller strides give lower (better) perplexity and
  cost ``window / stride`` times more compute.

Every scored token's negative log-likelihood is summed in float64; perplexity is
``exp(sum / scored tokens)``. Each window is one ``model(ids[None])`` forward from position 0
(no KV cache), so windows are independent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsyskit.errors import UserError

DEFAULT_WINDOW = 512


@dataclass
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll`` is the mean negative log-likelihood (nats) over the
    ``tokens`` scored tokens of ``windows`` forward passes."""

    perplexity: float
    nll: float
    tokens: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of every window over ``n_tokens`` tokens: the window is
    ``ids[begin:end]`` and the tokens ``ids[first_scored:end]`` are scored in it."""
    stride = window if stride is None else stride
    if window < 2:
        raise UserError(f"the window must hold at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise UserError(f"the stride must be in [1, window={window}], got {stride}")
    if n_tokens < 2:
        raise UserError(f"perplexity needs at least 2 tokens of text, got {n_tokens}")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)  # token `begin` has no context in this window
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: Tensor,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` (``model(ids (1, T)) -> logits (1, T, V)``) on the 1-D token
    ids ``ids``, with the windows of :func:`windows`."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and window > max_len:
        raise UserError(f"window {window} exceeds the model's context of {max_len} tokens")
    spans = windows(ids.numel(), window, stride)
    from tqdm import tqdm

    total, scored = 0.0, 0
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
        logits = model(ids[begin:end].unsqueeze(0))[0]
        # logits at position p predict token p + 1
        pred = logits[first - begin - 1 : end - begin - 1].float()
        total += F.cross_entropy(pred, ids[first:end], reduction="sum").double().item()
        scored += end - first
    nll = total / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored, windows=len(spans))


def linear_weight_bits(model: nn.Module) -> tuple[int, float]:
    """(weights, bits) of the model's linear layers: the matrices its matmuls read.

    A :class:`~mlsyskit.quant.linear.QuantLinear` counts its stored bits (codes, 16-bit scales
    and zero points: ``QuantScheme.bits_per_weight``); an ``nn.Linear`` its dtype's bits (32
    for fp32). A model with tied embeddings and no ``lm_head`` module reads the embedding
    matrix as its output projection, so that counts as a linear weight too.
    """
    from mlsyskit.quant.linear import QuantLinear

    n, bits = 0, 0.0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            k = m.out_features * m.in_features
            n, bits = n + k, bits + k * m.scheme.bits_per_weight(m.out_features, m.in_features)
        elif isinstance(m, nn.Linear):
            n, bits = n + m.weight.numel(), bits + m.weight.numel() * m.weight.element_size() * 8
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "tie_embeddings", False) and "lm_head" not in model._modules:
        w = model.embed.weight
        n, bits = n + w.numel(), bits + w.numel() * w.element_size() * 8
    return n, bits


def bits_per_weight(model: nn.Module) -> float:
    """Average stored bits per linear weight (see :func:`linear_weight_bits`); fp32 = 32."""
    n, bits = linear_weight_bits(model)
    if n == 0:
        raise UserError("the model has no linear layers")
    return bits / n


def source_bits_per_weight(model: nn.Module, source: str | Path) -> float:
    """Bits per linear weight of ``model`` loaded from ``source``: for a GGUF file whose
    weights the model holds in float (dequantized on load) the bits of the file's own block
    formats (:func:`mlsyskit.models.gguf_loader.linear_weight_bits`), else
    :func:`bits_per_weight` of the model."""
    from mlsyskit.quant.linear import QuantLinear

    p = Path(source)
    requantized = any(isinstance(m, QuantLinear) for m in model.modules())
    if p.is_file() and p.suffix.lower() == ".gguf" and not requantized:
        from mlsyskit.models.gguf_loader import linear_weight_bits as gguf_bits

        n, bits = gguf_bits(p)
        if n:
            return bits / n
    return bits_per_weight(model)


def file_bytes(path: str | Path) -> int:
    """Bytes on disk of a checkpoint: the file, or every file in the directory (not recursive)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or empty file is a UserError."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p} as UTF-8 text ({e})") from None
    if not text.strip():
        raise UserError(f"text file {p} is empty")
    return text


def default_text_path() -> Path:
    """Tiny Shakespeare from the data dir ($MLSYSKIT_DATA_DIR) or the cache (never downloads)."""
    from mlsyskit.data.paths import DATA_DIR_ENV, resolve_data_dir
    from mlsyskit.data.shakespeare import locate_shakespeare

    try:
        return locate_shakespeare(resolve_data_dir(None), download_missing=False)
    except UserError:
        raise UserError(
            f"no --text given and Tiny Shakespeare was not found (${DATA_DIR_ENV}/shakespeare/"
            "input.txt or the cache); pass --text FILE"
        ) from None
