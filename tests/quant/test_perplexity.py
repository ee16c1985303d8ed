"""Perplexity windows and bits per weight, checked against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import load_checkpoint
from mlsyskit.models.transformer import build_transformer
from mlsyskit.quant.linear import QuantLinear, int8_weight_only, parse_quantization, quantize_
from mlsyskit.quant.perplexity import bits_per_weight, linear_weight_bits, perplexity, windows


def test_windows_non_overlapping_and_strided() -> None:
    # stride = window: each window scores all but its first token
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # stride < window: each window scores what the previous one did not (its last tokens)
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    spans = windows(1000, 64, 16)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, 1000))  # every token but the first, exactly once
    assert all(end - begin <= 64 for begin, end, _ in spans)
    for bad in ((10, 1, None), (10, 4, 0), (10, 4, 5), (1, 4, None)):
        with pytest.raises(UserError):
            windows(*bad)


class Bigram(nn.Module):
    """A model whose log-probabilities are known: logits depend only on the current token."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


@pytest.mark.parametrize("window, stride", [(8, None), (8, 3), (100, None)])
def test_perplexity_by_hand(window: int, stride: int | None) -> None:
    model = Bigram()
    ids = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    logp = F.log_softmax(model.table, -1)
    nll = [-logp[ids[t - 1], ids[t]].item() for t in range(1, 50)]
    # a bigram model needs one token of context, so windows that keep it score identically
    if stride is None and window < 50:  # ... but non-overlapping windows lose their first token
        skipped = set(range(window, 50, window))
        nll = [v for t, v in zip(range(1, 50), nll, strict=True) if t not in skipped]
    res = perplexity(model, ids, window, stride)
    assert res.tokens == len(nll)
    assert res.nll == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)


def test_transformer_perplexity_matches_one_full_forward(tiny_llama_dir: Path) -> None:
    ckpt = load_checkpoint(tiny_llama_dir)
    model = build_transformer(ckpt.config, ckpt.state_dict)
    ids = torch.arange(100, 160)
    logits = model(ids.unsqueeze(0))[0]
    ref = F.cross_entropy(logits[:-1], ids[1:]).item()
    assert perplexity(model, ids, window=60).nll == pytest.approx(ref, rel=1e-5)
    with pytest.raises(UserError, match="context"):
        perplexity(model, ids, window=1000)


def test_bits_per_weight_by_hand(tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> None:
    ckpt = load_checkpoint(tiny_llama_dir)
    model = build_transformer(ckpt.config, ckpt.state_dict)
    dim, vocab = 64, 49152
    # per layer: qkv (128 x 64), o_proj (64 x 64), gate_up (256 x 64), down (64 x 128)
    per_layer = 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128
    n = 2 * per_layer + vocab * dim
    assert linear_weight_bits(model) == (n, 32.0 * n)
    assert bits_per_weight(build_transformer(ckpt.config, ckpt.state_dict, torch.bfloat16)) == 16
    quantize_(model, parse_quantization("int4-g32"))
    assert bits_per_weight(model) == pytest.approx(4 + (16 + 4) / 32)
    # int8 per channel: one 16-bit scale and one 8-bit zero point per output row of each matrix
    model = build_transformer(ckpt.config, ckpt.state_dict)
    quantize_(model, parse_quantization("int8"))
    rows = 2 * (128 + 64 + 256 + 64) + vocab
    assert bits_per_weight(model) == pytest.approx(8 + (16 + 8) * rows / n)
    # symmetric: no zero points
    model = build_transformer(ckpt.config, ckpt.state_dict)
    quantize_(model, int8_weight_only(symmetric=True))
    assert bits_per_weight(model) == pytest.approx(8 + 16 * rows / n)
    # tied embeddings: the fp32 model reads the embedding as its head, the quantized one a copy
    tied = load_checkpoint(tiny_qwen2_dir)
    model = build_transformer(tied.config, tied.state_dict)
    assert linear_weight_bits(model)[0] == n
    quantize_(model, parse_quantization("int4-g32"))
    assert isinstance(model.lm_head, QuantLinear)
    assert linear_weight_bits(model)[0] == n
