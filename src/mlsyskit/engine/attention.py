"""The paged KV cache tensors and attention over them.

The pool is preallocated once: per layer, keys and values of shape
``(num_blocks, block_size, n_kv_heads, head_dim)``. A step's tokens write their k/v into the
slots the block manager gave them (``index_copy_``), then attend:

- decode rows (one new token per sequence) are batched: each sequence's blocks are gathered
  into a padded ``(B, max_blocks * block_size)`` context and one masked SDPA call serves all;
- prefill chunks run one SDPA per sequence, causal within the chunk and over the cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PrefillChunk:
    start: int  # first row in the step's flat token array
    length: int  # tokens of this chunk
    context: int  # tokens of context after the chunk (cached prefix + chunk)
    blocks: Tensor  # (n_blocks,) block ids covering the context
    mask: Tensor | None  # (length, context) bool; None means plain causal (no cached prefix)


@dataclass
class StepMeta:
    """Where this step's tokens go and what each one attends to (shared by all layers)."""

    slot_mapping: Tensor  # (T,) flat slot = block_id * block_size + offset
    num_decode: int  # rows 0..num_decode-1 are single-token decodes
    decode_blocks: Tensor | None  # (num_decode, max_blocks) block ids, padded with 0
    decode_mask: Tensor | None  # (num_decode, 1, 1, max_blocks * block_size) additive float; None: no padding
    prefills: list[PrefillChunk]
    decode_len: int | None = None  # set when a single sequence decodes: its context length


class PagedKVCache:
    """Preallocated key/value pools for every layer."""

    def __init__(
        self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.block_size = block_size
        self.meta: StepMeta | None = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def layer(self, i: int) -> _LayerKV:
        return _LayerKV(self.k[i], self.v[i], self.meta)


class _LayerKV:
    __slots__ = ("k_pool", "v_pool", "meta")

    def __init__(self, k_pool: Tensor, v_pool: Tensor, meta: StepMeta | None) -> None:
        self.k_pool, self.v_pool, self.meta = k_pool, v_pool, meta

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q`` ``(T, H, D)``, ``k``/``v`` ``(T, Hkv, D)`` → ``(T, H, D)``."""
        meta = self.meta
        assert meta is not None, "PagedKVCache.meta must be set before the forward pass"
        _, bs, hkv, d = self.k_pool.shape
        flat_k, flat_v = self.k_pool.view(-1, hkv, d), self.v_pool.view(-1, hkv, d)
        flat_k.index_copy_(0, meta.slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, meta.slot_mapping, v.to(flat_v.dtype))
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            b = meta.decode_blocks.flatten()  # index_select copies whole blocks: ~3x aten::index
            kd = self.k_pool.index_select(0, b).view(nd, -1, hkv, d)
            vd = self.v_pool.index_select(0, b).view(nd, -1, hkv, d)
            if meta.decode_len is not None:  # one sequence: cut to its length, no mask needed
                kd, vd = kd[:, : meta.decode_len], vd[:, : meta.decode_len]
            kd, vd = kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype)
            y = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
            out[:nd] = y.squeeze(2)
        for c in meta.prefills:
            qc = q[c.start : c.start + c.length].transpose(0, 1).unsqueeze(0)
            if c.mask is None:  # no cached prefix: the chunk's own k/v are the whole context
                kc = k[c.start : c.start + c.length]
                vc = v[c.start : c.start + c.length]
            else:
                kc = self.k_pool.index_select(0, c.blocks).view(-1, hkv, d)[: c.context].to(q.dtype)
                vc = self.v_pool.index_select(0, c.blocks).view(-1, hkv, d)[: c.context].to(q.dtype)
            kc, vc = kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0)
            y = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None, enable_gqa=True
            )
            out[c.start : c.start + c.length] = y[0].transpose(0, 1)
        return out
