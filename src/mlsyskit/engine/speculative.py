"""Speculative decoding by prompt lookup (n-gram drafting), as vLLM's ``ngram`` speculator and
transformers' ``prompt_lookup_num_tokens``.

No draft model: the last ``n`` tokens of a sequence (``n`` from ``ngram_max`` down to
``ngram_min``) are looked up among its earlier tokens (prompt and output); where they occurred
before, the up to ``k`` tokens that followed are the draft. The scheduler puts a drafting
sequence's pending token and its draft in one step (``1 + len(draft)`` positions through the
paged KV cache, each computed as a decode row of its own, see
:class:`~mlsyskit.engine.model_runner.ModelRunner`); :func:`accept` keeps the longest prefix of
the draft the model agrees with plus the model's own next token, so every verify step emits
1 to ``k + 1`` tokens. The KV of rejected positions is dropped: ``num_computed`` advances only
over the kept ones and whole blocks past them go back to the pool (:meth:`~mlsyskit.engine.block_manager.BlockManager.shrink`).

Greedy requests get exactly the tokens they get without drafting (the model's argmax at every
position). Sampled requests (``temperature > 0``) use rejection sampling against the draft,
which for a deterministic draft token ``d`` is: accept with probability ``p(d)``, else sample
from ``p`` with ``d`` removed (renormalised); all accepted: one more token from the last
position's ``p``. The tokens have the distribution of plain sampling, but a seeded request
draws its random numbers differently, so its text differs from the text without drafting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mlsyskit.engine.sampling import SamplingParams, filter_logits
from mlsyskit.errors import UserError

if TYPE_CHECKING:
    from mlsyskit.engine.sequence import Sequence

SPECULATIVE = ("ngram",)


@dataclass
class NgramIndex:
    """Where each n-gram of a sequence first occurred: ``first[gram]`` is the index of the token
    after its first occurrence. Extended as the sequence grows (O(1) per token and ``n``)."""

    sizes: tuple[int, ...]
    first: dict[tuple[int, ...], int] = field(default_factory=dict)
    done: int = 0  # tokens[:done] are indexed (as continuations)

    def extend(self, tokens: list[int]) -> None:
        # an n-gram ending before token i is indexed once token i exists (a draft needs one)
        for i in range(max(self.done, 1), len(tokens)):
            for n in self.sizes:
                if i >= n:
                    self.first.setdefault(tuple(tokens[i - n : i]), i)
        self.done = max(self.done, len(tokens))


class NgramProposer:
    """Drafts up to ``k`` tokens by prompt lookup; ``ngram_max`` >= ``ngram_min`` >= 1."""

    def __init__(self, k: int, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if k < 1:
            raise UserError(f"num_speculative_tokens must be at least 1, got {k}")
        if not 1 <= ngram_min <= ngram_max:
            raise UserError(f"need 1 <= ngram_min <= ngram_max, got ngram_min={ngram_min}, ngram_max={ngram_max}")
        self.k, self.ngram_max, self.ngram_min = k, ngram_max, ngram_min
        self._sizes = tuple(range(ngram_max, ngram_min - 1, -1))
        self.num_drafts = 0  # verify steps run (sequences with a draft)
        self.num_draft_tokens = 0  # tokens drafted
        self.num_accepted = 0  # of those, accepted

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens likely to follow ``seq``; [] when its last tokens
        never occurred before."""
        k = min(self.k, limit)
        if k < 1:
            return []
        index = seq.ngram_index
        if index is None:
            index = seq.ngram_index = NgramIndex(self._sizes)
        tokens = seq.token_ids
        index.extend(tokens)
        for n in self._sizes:
            if len(tokens) <= n:
                continue
            j = index.first.get(tuple(tokens[-n:]))
            if j is not None:
                return tokens[j : j + k]
        return []

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted += accepted

    def stats(self) -> dict[str, float]:
        """Verify steps, drafted and accepted tokens, acceptance rate, mean accepted length."""
        return {
            "verify_steps": self.num_drafts,
            "draft_tokens": self.num_draft_tokens,
            "accepted_tokens": self.num_accepted,
            "acceptance_rate": self.num_accepted / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            "mean_accepted": self.num_accepted / self.num_drafts if self.num_drafts else 0.0,
        }


def make_proposer(speculative: str | None, num_speculative_tokens: int, ngram_max: int, ngram_min: int) -> NgramProposer | None:
    """The proposer of the ``speculative=`` option (``None``: off)."""
    if speculative is None:
        return None
    if speculative not in SPECULATIVE:
        raise UserError(f"unknown speculative method {speculative!r}; use one of {', '.join(SPECULATIVE)}")
    return NgramProposer(num_speculative_tokens, ngram_max, ngram_min)


def accept(logits: Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """The tokens a verify step emits: ``logits`` ``(len(draft) + 1, V)`` are the model's at the
    pending token and at each draft token. Greedy: the draft's longest prefix matching the
    argmax, then the argmax after it. Sampled: rejection sampling (see the module docs)."""
    if params.greedy:
        best = logits.argmax(-1).tolist()
        m = 0
        while m < len(draft) and draft[m] == best[m]:
            m += 1
        return best[: m + 1]
    out: list[int] = []
    for i, d in enumerate(draft):
        p = filter_logits(logits[i], params.temperature, params.top_k, params.top_p).softmax(-1)
        u = float(torch.rand((), generator=generator))
        if u < float(p[d]):
            out.append(d)
            continue
        p[d] = 0.0  # the residual max(p - q, 0) of a one-hot draft q
        out.append(int(torch.multinomial(p / p.sum(), 1, generator=generator)))
        return out
    p = filter_logits(logits[len(draft)], params.temperature, params.top_k, params.top_p).softmax(-1)
    out.append(int(torch.multinomial(p, 1, generator=generator)))
    return out

