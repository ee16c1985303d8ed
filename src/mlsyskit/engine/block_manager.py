"""Paged KV memory: fixed-size blocks from a preallocated pool, reference counts, a free list and
prefix caching of full blocks by content hash (as in vLLM / nano-vllm).

A full block's hash chains the hash of the block before it, so equal hashes mean equal token
prefixes (the tokens are compared too, so a hash collision cannot mix contexts). Two requests with
the same system prompt share those blocks (reference count 2). A freed block keeps its contents
and hash until it is reused, so a later request can still hit it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlsyskit.engine.kv_tiers import chain_key
from mlsyskit.engine.sequence import Sequence

if TYPE_CHECKING:
    from mlsyskit.engine.kv_tiers import KVTiers


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered
    token_ids: tuple[int, ...] = field(default_factory=tuple)
    filled: int = 0  # tokens of real KV it holds
    key: bytes | None = None  # tier key (SHA-256 chain), set with ``hash`` when tiers exist


def _chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))  # ints and tuples hash deterministically in CPython


class BlockManager:
    """Owns block ids ``0..num_blocks-1``; the KV tensors themselves live in ``PagedKVCache``."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 tiers: KVTiers | None = None) -> None:
        self.block_size = block_size
        self.tiers = tiers
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in least-recently-freed order; cached (hashed) ones stay findable by hash.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache (lifetime)
        self.prefix_queries = 0  # prompt tokens looked up (lifetime)
        self.tier_hits = 0  # of those, tokens loaded back from a tier (lifetime)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ------------------------------------------------------------------------
    def _take_free(self) -> Block:
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if self.tiers is not None:
            self.tiers.settle([bid])  # a load still being copied into it finishes first
        if b.hash is not None and self.hash_to_block.get(b.hash) == bid:
            del self.hash_to_block[b.hash]  # its old contents are about to be overwritten
            if self.tiers is not None and b.key is not None:
                self.tiers.save(bid, b.key, b.token_ids)  # ... so they go down a tier first
        b.hash, b.key, b.token_ids, b.filled, b.ref_count = None, None, (), 0, 1
        return b

    def _ref(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count == 0:
            del self.free[bid]
        b.ref_count += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached full blocks that hold a prefix of ``seq`` (at least one token is left
        to compute, since sampling needs its logits). Returns the number of cached tokens."""
        assert not seq.block_table
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        prev = None
        key = self.tiers.root if self.tiers is not None else None
        n_full = (len(seq) - 1) // bs
        self.prefix_queries += len(seq)
        loaded = 0
        for i in range(n_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = _chain_hash(prev, tokens)
            if key is not None:
                key = chain_key(key, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                if not self._load_from_tier(seq, h, key, tokens):
                    break
                loaded += 1
            else:
                self._ref(bid)
                seq.block_table.append(bid)
            prev = h
        cached = len(seq.block_table) * bs
        self.prefix_hits += cached
        self.tier_hits += loaded * bs
        seq.num_computed = seq.num_prefix_cached = cached
        return cached

    def _load_from_tier(self, seq: Sequence, h: int, key: bytes | None, tokens: tuple[int, ...]) -> bool:
        """Bring the block keyed ``key`` back from a tier into a free pool block."""
        if key is None or not self.free or not self.tiers.has(key):
            return False
        b = self._take_free()
        if self.tiers.load(b.block_id, key, tokens) is None:
            b.ref_count = 0
            self.free[b.block_id] = None
            self.free.move_to_end(b.block_id, last=False)  # reused first: it holds nothing
            return False
        b.hash, b.key, b.token_ids, b.filled = h, key, tokens, self.block_size
        self.hash_to_block[h] = b.block_id
        seq.block_table.append(b.block_id)
        return True

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens of KV after taking free blocks."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` blocks for ``num_tokens`` tokens (call :meth:`can_grow` first)."""
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free().block_id)

    def commit(self, seq: Sequence) -> None:
        """Record that ``seq.num_computed`` tokens now hold KV; register newly full blocks."""
        bs = self.block_size
        n = seq.num_computed
        for i, bid in enumerate(seq.block_table):
            b = self.blocks[bid]
            b.filled = max(0, min(bs, n - i * bs))
            if b.filled == bs and b.hash is None and self.prefix_caching:
                prev = self.blocks[seq.block_table[i - 1]].hash if i else None
                if i and prev is None:
                    break  # the chain is broken (should not happen): do not register
                b.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                b.hash = _chain_hash(prev, b.token_ids)
                if self.tiers is not None:
                    prev_key = self.blocks[seq.block_table[i - 1]].key if i else self.tiers.root
                    b.key = None if prev_key is None else chain_key(prev_key, b.token_ids)
                self.hash_to_block.setdefault(b.hash, bid)

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Give back ``seq``'s blocks past the first ``num_tokens`` tokens (the counterpart of
        :meth:`grow`: a verified draft's rejected positions)."""
        keep = self.blocks_needed(num_tokens)
        if len(seq.block_table) > keep:
            self._release(seq.block_table[keep:])
            seq.block_table = seq.block_table[:keep]

    def free_seq(self, seq: Sequence) -> None:
        """Drop ``seq``'s references (see :meth:`_release`)."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def _release(self, table: list[int]) -> None:
        """Drop one reference to each block of ``table``; blocks nobody uses go back to the
        free list (last block first, so a sequence's tail is reused before its shareable head)."""
        for bid in reversed(table):
            b = self.blocks[bid]
            b.ref_count -= 1
            if b.ref_count == 0:
                if b.hash is None:
                    b.filled = 0
                self.free[bid] = None

    # -- swap --------------------------------------------------------------------------------
    def swap_out(self, seq: Sequence) -> bool:
        """Copy ``seq``'s computed blocks to the host tier and free them; False (nothing done)
        when the tier has no room. ``seq.num_computed`` is kept for :meth:`swap_in`."""
        n = self.blocks_needed(seq.num_computed)
        slots = self.tiers.swap_out(seq.block_table[:n]) if self.tiers is not None and n else None
        if slots is None:
            return False
        computed = seq.num_computed
        self.free_seq(seq)
        seq.swapped, seq.num_computed = slots, computed
        return True

    def swap_in(self, seq: Sequence) -> bool:
        """Take pool blocks for a swapped-out ``seq`` and copy its KV back; False when the pool
        has no room yet (it stays swapped)."""
        n = len(seq.swapped)
        if n > self.num_free:
            return False
        bids = [self._take_free().block_id for _ in range(n)]
        self.tiers.swap_in(seq.swapped, bids)
        seq.block_table, seq.swapped = bids, None
        self.commit(seq)  # full blocks are shareable (and tier-keyed) again
        return True

    def drop_swapped(self, seq: Sequence) -> None:
        """Release a swapped-out sequence's host slots (it finished or was aborted)."""
        if seq.swapped is not None:
            self.tiers.release(seq.swapped)
            seq.swapped = None

    # -- accounting ------------------------------------------------------------------------
    def usage(self) -> dict[str, float]:
        """How much of the pool is in use and how much of that holds real tokens."""
        used = [b for b in self.blocks if b.ref_count > 0]
        tokens = sum(b.filled for b in used)
        cap = len(used) * self.block_size
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": len(used),
            "blocks_free": self.num_free,
            "blocks_shared": sum(1 for b in used if b.ref_count > 1),
            "tokens_stored": tokens,
            "fill_ratio": tokens / cap if cap else 1.0,
            "prefix_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
            **({} if self.tiers is None else {
                "tier_hit_tokens": self.tier_hits,
                **{f"tier_{k}": v for k, v in self.tiers.usage().items()},
            }),
        }
