"""Flat parameter vectors: the unit the server samples, attacks and aggregates.

The global model is one float32 vector of P numbers, and a round's client results are a
(K, P) matrix, so every strategy is plain tensor arithmetic and bytes on the wire are 4 * P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a module's parameters, in `named_parameters()` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamSpec:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, params: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate a (possibly stacked) parameter dict into (..., P)."""
        lead = params[self.names[0]].shape[:batch_dims]
        return torch.cat([params[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split (..., P) into new tensors of shape (..., *param_shape) (copies, safe to update)."""
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.numels, dim=-1)
        return {
            n: c.reshape(*lead, *s).clone()
            for n, c, s in zip(self.names, chunks, self.shapes, strict=True)
        }


def get_flat(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached float32 vector (any memory format)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the model's parameters (in place, no new module).

    Unlike `vector_to_parameters`, this copies: the parameters never alias `flat`, so
    training the model cannot silently change the global weights.
    """
    with torch.no_grad():
        params = list(model.parameters())
        for p, chunk in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
            p.copy_(chunk.view_as(p))
