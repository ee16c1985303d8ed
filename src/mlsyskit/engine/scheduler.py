"""Which sequences run in the next step, and how many of their tokens.

``continuous`` (iteration-level, as in Orca / vLLM): every step, running sequences first (a decode
costs one token of the budget, a prompt still being prefilled gets the next chunk), then waiting
requests are admitted while the token budget ``max_num_batched_tokens`` and ``max_num_seqs``
allow; a long prompt is split into chunks so it never stalls the decoders. While no sequence is
decoding there is no decoder to stall, and the budget is ``max_prefill_tokens`` (larger): many
requests arriving at once are prefilled in a few large steps, as static batching does, instead
of many small ones that each read every weight. When the KV pool runs out, the most recently
admitted sequence is preempted: it goes back to the front of the queue (its generated tokens
are kept) and its blocks are freed, to be recomputed later, or, with a host tier and a
:class:`~mlsyskit.engine.kv_cost.SwapPolicy` that prefers it, first swapped out, to be copied
back when it is admitted again.

With a speculative ``proposer`` (:mod:`mlsyskit.engine.speculative`), a decoding sequence whose
last tokens occurred before gets a draft: its step computes the pending token and the draft
(``1 + len(draft)`` tokens of the budget) and keeps what the model agrees with.

``static`` (the naive baseline): a batch of up to ``max_num_seqs`` requests is admitted only when
the previous batch has completely finished; whole prompts are prefilled at once.
"""

from __future__ import annotations

from collections import deque

from mlsyskit.engine.block_manager import BlockManager
from mlsyskit.engine.kv_cost import SwapPolicy
from mlsyskit.engine.sequence import Sequence, Status
from mlsyskit.engine.speculative import NgramProposer

BATCHING = ("continuous", "static")


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager | None,
        *,
        batching: str = "continuous",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_prefill_tokens: int = 16384,
        swap_policy: SwapPolicy | None = None,
        proposer: NgramProposer | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.bm = block_manager  # None: no KV cache (recompute mode), nothing to allocate
        self.swap_policy = swap_policy  # None: preempted sequences are always recomputed
        self.proposer = proposer  # None: no speculative decoding
        self.max_model_len = max_model_len
        self.batching = batching
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens = max(max_prefill_tokens, max_num_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swaps = 0  # preemptions that swapped out instead of dropping the KV

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if self.bm is not None:
            self.bm.drop_swapped(seq)
            self.bm.free_seq(seq)
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        p = self.swap_policy
        if p is not None and seq.num_computed and p.prefer_swap(seq.num_computed) and self.bm.swap_out(seq):
            self.num_swaps += 1
        else:
            self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for ``n`` more tokens of ``seq``; preempt later sequences until they fit."""
        if self.bm is None:
            return True
        while not self.bm.can_grow(seq, seq.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.bm.grow(seq, seq.num_computed + n)
        return True

    def _draft(self, seq: Sequence, room: float) -> list[int]:
        """Draft tokens for decoding ``seq``, at most ``room`` and no more than its output may
        still take after the token the step computes anyway."""
        if seq.num_computed != len(seq) - 1:  # a prompt chunk (or a recompute) still runs
            return []
        limit = int(min(room, seq.params.max_tokens - seq.num_output_tokens - 1))
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len - len(seq) - 1)
        return self.proposer.propose(seq, limit)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: ``(sequence, number of new tokens to compute)`` pairs."""
        static = self.batching == "static"
        decoding = any(s.num_computed >= s.num_prompt_tokens for s in self.running)
        budget = float("inf") if static else self.max_num_batched_tokens if decoding else self.max_prefill_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = int(min(len(seq) - seq.num_computed, budget))
            seq.draft = self._draft(seq, budget - 1) if n == 1 and self.proposer is not None else []
            n += len(seq.draft)
            if self._reserve(seq, n):
                batch.append((seq, n))
                budget -= n
        # A preempted sequence may have been scheduled before its victim-maker ran: drop it.
        for s, _ in batch:
            if s.status is not Status.RUNNING:
                s.draft = []
        batch = [(s, n) for s, n in batch if s.status is Status.RUNNING]
        if static and self.running:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.swapped is not None:  # its KV comes back from the host tier
                n = int(min(len(seq) - seq.num_computed, budget))
                if self.bm.blocks_needed(seq.num_computed + n) > self.bm.num_free:
                    break
                self.bm.swap_in(seq)
            elif self.bm is not None:
                self.bm.match_prefix(seq)
            n = int(min(len(seq) - seq.num_computed, budget))
            if self.bm is not None:
                if not self.bm.can_grow(seq, seq.num_computed + n):
                    self.bm.free_seq(seq)  # undo the prefix match; try again next step
                    break
                self.bm.grow(seq, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch
