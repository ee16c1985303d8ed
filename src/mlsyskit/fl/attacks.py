"""Malicious clients for robustness studies, and the server's guard against non-finite updates."""

from __future__ import annotations

import numpy as np
import torch


def choose_malicious(num_clients: int, count: int, seed: int) -> np.ndarray:
    """A fixed, seeded set of malicious client ids (sorted)."""
    rng = np.random.default_rng([seed, 0xBAD])
    return np.sort(rng.choice(num_clients, size=count, replace=False)) if count else np.zeros(0, int)


def poison(
    kind: str, model: torch.Tensor, global_w: torch.Tensor, scale: float, gen: torch.Generator
) -> torch.Tensor:
    """What a malicious client sends instead of its honestly trained `model`.

    label-flip is applied during training (flipped labels), so the model passes through.
    """
    delta = model - global_w
    if kind == "sign-flip":
        return global_w - scale * delta
    if kind == "scale":
        return global_w + scale * delta
    if kind == "noise":
        std = scale * float(delta.std()) + 1e-12
        return global_w + std * torch.randn(delta.shape, generator=gen)
    if kind == "nan":
        return torch.full_like(model, float("nan"))
    if kind == "label-flip":
        return model
    raise ValueError(f"unknown attack {kind!r}")


def finite_rows(models: torch.Tensor) -> torch.Tensor:
    """Mask of client models that are entirely finite (NaN/Inf ones must never be averaged)."""
    return torch.isfinite(models).all(dim=1)
