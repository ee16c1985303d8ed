"""A request as the engine sees it: its tokens, its KV blocks and how far it has been computed."""

from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import Any

import torch

from mlsyskit.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Prompt plus generated tokens.

    ``num_computed`` counts the leading tokens whose keys/values are in the cache (computed or
    found by prefix caching); the scheduler computes the rest in chunks. After a preemption it
    drops to 0 and the whole sequence, generated tokens included, is recomputed, unless its
    blocks were swapped out to the host tier: then ``swapped`` holds their host slots and
    ``num_computed`` is kept for when they come back. With speculative decoding the scheduler
    may put ``draft`` tokens after the pending one for a step to verify.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.swapped: list[int] | None = None  # host-tier slots of a swapped-out sequence
        self.num_computed = 0
        self.num_prefix_cached = 0  # tokens served from the prefix cache at (last) admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        # speculative decoding: this step's draft tokens (verified after the pending token)
        self.draft: list[int] = []
        self.ngram_index: Any = None  # the n-gram proposer's lookup table (speculative.NgramIndex)
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, len={len(self)}, computed={self.num_computed}, "
            f"blocks={len(self.block_table)}, {self.status.name})"
        )
