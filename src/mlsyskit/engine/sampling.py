"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mlsyskit.errors import UserError


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's names).

    ``temperature=0`` is greedy. ``top_k=0``/``top_p=1`` disable those filters. ``seed`` makes a
    request's output reproducible whatever else is in the batch. Generation stops at an EOS token
    (unless ``ignore_eos``), at any string in ``stop`` (not included in the text) or after
    ``max_tokens`` new tokens.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature-scaled logits ``(V,)`` with tokens outside top-k / the top-p nucleus at -inf."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        x = x.index_put((order[drop],), torch.tensor(float("-inf")))
    return x


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` ``(B, V)``.

    Random rows use the exponential-race form of categorical sampling (argmax of p / E with
    E ~ Exp(1)) drawn from the row's own generator, so a seeded request gets the same tokens
    whatever batch it runs in.
    """
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=g)
        out[i] = int((probs / noise).argmax())
    return out
