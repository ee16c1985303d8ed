"""Block manager: reference counts, the free list and prefix caching by content hash."""

from __future__ import annotations

from mlsyskit.engine.block_manager import BlockManager
from mlsyskit.engine.sampling import SamplingParams
from mlsyskit.engine.sequence import Sequence


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def _compute(bm: BlockManager, seq: Sequence) -> None:
    bm.grow(seq, len(seq))
    seq.num_computed = len(seq)
    bm.commit(seq)


def test_grow_free_and_reuse() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq(list(range(10)))
    assert bm.can_grow(a, 10) and not bm.can_grow(a, 17)
    _compute(bm, a)
    assert len(a.block_table) == 3 and bm.num_free == 1
    u = bm.usage()
    assert (u["blocks_used"], u["tokens_stored"]) == (3, 10)
    bm.free_seq(a)
    assert bm.num_free == 4 and a.block_table == [] and bm.usage()["blocks_used"] == 0


def test_prefix_blocks_are_shared_by_reference_count() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(bm, a)
    b = _seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert bm.match_prefix(b) == 8  # two full blocks
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    assert bm.usage()["blocks_shared"] == 2
    bm.free_seq(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]
    bm.free_seq(b)
    assert bm.num_free == 8


def test_a_prompt_keeps_one_token_to_compute_and_a_different_prefix_misses() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    _compute(bm, _seq([1, 2, 3, 4, 5, 6, 7, 8]))
    same = _seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.match_prefix(same) == 4  # the last block would leave nothing to compute
    bm.free_seq(same)
    other = _seq([9, 2, 3, 4, 5, 6, 7, 8])
    assert bm.match_prefix(other) == 0  # same second block, different first: chained hash
    assert not BlockManager(8, 4, prefix_caching=False).match_prefix(_seq([1, 2, 3, 4, 5]))


def test_freed_cached_blocks_serve_hits_until_they_are_reused() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _compute(bm, a)
    bm.free_seq(a)
    hit = _seq([1, 2, 3, 4, 9])
    assert bm.match_prefix(hit) == 4  # blocks of a finished request
    bm.free_seq(hit)
    # the free list hands out the tail block first, then the cached ones: after they are
    # overwritten, the old prefix no longer hits
    c = _seq([7, 7, 7, 7, 7, 7])
    _compute(bm, c)
    bm.free_seq(c)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 9])) == 0
