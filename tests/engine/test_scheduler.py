"""Scheduler: the token budget of a step."""

from __future__ import annotations

from mlsyskit.engine.block_manager import BlockManager
from mlsyskit.engine.sampling import SamplingParams
from mlsyskit.engine.scheduler import Scheduler
from mlsyskit.engine.sequence import Sequence


def test_the_larger_budget_applies_only_while_nothing_decodes() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8, max_prefill_tokens=40)
    for _ in range(4):
        sched.add(Sequence(list(range(12)), SamplingParams(max_tokens=4)))
    batch = sched.schedule()  # nothing decodes yet: 40 tokens, three whole prompts and a chunk
    assert [n for _, n in batch] == [12, 12, 12, 4]
    for seq, n in batch:
        seq.num_computed += n
        sched.bm.commit(seq)
        if seq.num_computed == len(seq):
            seq.token_ids.append(7)  # the engine appends the sampled token
    batch = sched.schedule()  # three sequences decode now: 8 tokens in all, the rest a chunk
    assert [n for _, n in batch] == [1, 1, 1, 5]
