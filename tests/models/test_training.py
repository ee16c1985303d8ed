"""Tiny overfit checks: a few dozen SGD steps on one small structured batch cut the loss."""

import torch
import torch.nn.functional as F
from torch import Tensor

from mlsyskit.models import build_model


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for (B, C) or (B, T, V) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes, each a bright 6x4 patch at its own place, plus noise (MNIST-ish)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10)
    x = 0.1 * torch.randn(10, 1, 28, 28, generator=g)
    for i in range(10):
        r, c = divmod(i, 5)
        x[i, 0, 4 + 10 * r : 10 + 10 * r, 2 + 5 * c : 6 + 5 * c] += 1.0
    return x, y


def _text(seq: int = 24, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, int]:
    text = "to be, or not to be, that is the question: whether 'tis nobler in the mind " * 4
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    idx = torch.stack([data[i * 7 : i * 7 + seq + 1] for i in range(batch)])
    return idx[:, :-1], idx[:, 1:], len(chars)


def _train(model, x, y, steps: int, lr: float, momentum: float = 0.0) -> tuple[float, float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        loss = ce_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_cnn_overfits_small_batch() -> None:
    x, y = _images()
    first, last = _train(build_model("cnn"), x, y, steps=15, lr=0.1, momentum=0.9)
    assert first > 2.0
    assert last < 0.5 * first


def test_lstm_overfits_small_batch() -> None:
    x, y, vocab = _text()
    first, last = _train(build_model("lstm", vocab_size=vocab), x, y, 40, lr=1.0, momentum=0.9)
    assert last < 0.8 * first


def test_transformer_overfits_small_batch() -> None:
    x, y, vocab = _text()
    model = build_model("transformer", vocab_size=vocab, seq_len=24)
    first, last = _train(model, x, y, steps=30, lr=0.1, momentum=0.9)
    assert last < 0.5 * first
