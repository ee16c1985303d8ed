"""The paged KV cache tensors and attention over them.

The pool is preallocated once: per layer, keys and values of shape
``(num_blocks, block_size, n_kv_heads, head_dim)``. A step's tokens write their k/v into the
slots the block manager gave them, then attend:

- decode rows (one new token per sequence) are batched. With the compiled kernels
  (:func:`mlsyskit.quant.kernels.attn_decode`, float32 or float16 pools) one call writes their k/v and
  attends by walking each sequence's block table in place. Without them, each sequence's blocks
  are gathered into a padded ``(B, max_blocks * block_size)`` context for one masked SDPA call;
- prefill chunks run one SDPA per sequence, causal within the chunk and over the cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mlsyskit.quant import kernels


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
    # for the compiled decode attention (None: gather + SDPA): block tables and context lengths
    decode_tables: Tensor | None = None  # (num_decode, max_blocks) int32
    decode_lens: Tensor | None = None  # (num_decode,) int32


class PagedKVCache:
    """Preallocated key/value pools for every layer."""

    def __init__(
        self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        # decode attention in place (compiled kernel) on float32 or float16 pools
        self.in_place_decode = dtype in (torch.float32, torch.float16) and kernels.available()
        # The kernel reads only slots written before; SDPA's masked padding would turn garbage
        # (NaN x 0) into NaN, so that path gets zeros (touching every page: ~0.1 s per GiB).
        alloc = torch.empty if self.in_place_decode else torch.zeros
        self.k = alloc(shape, dtype=dtype)
        self.v = alloc(shape, dtype=dtype)
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
        """``q`` ``(T, H, D)``, ``k``/``v`` ``(T, Hkv, D)`` → ``(T, H, D)``; rows
        ``0..num_decode-1`` are decodes, then the prefill chunks."""
        meta = self.meta
        assert meta is not None, "PagedKVCache.meta must be set before the forward pass"
        nd = meta.num_decode
        if not meta.prefills:
            return self._decode(q, k, v)
        out = torch.empty_like(q)
        self._prefill(q[nd:], k[nd:], v[nd:], out[nd:], row0=nd)
        if nd:
            out[:nd] = self._decode(q[:nd], k[:nd], v[:nd])
        return out

    def _decode(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the decode rows' k/v and attend each over its sequence's blocks."""
        meta = self.meta
        nd, (_, _, hkv, d) = q.shape[0], self.k_pool.shape
        if meta.decode_tables is not None:  # compiled: k/v written and attended in one call
            return kernels.attn_decode(q, k, v, meta.slot_mapping, self.k_pool, self.v_pool,
                                       meta.decode_tables, meta.decode_lens, d**-0.5)
        slots = meta.slot_mapping[:nd]
        self.k_pool.view(-1, hkv, d).index_copy_(0, slots, k.to(self.k_pool.dtype))
        self.v_pool.view(-1, hkv, d).index_copy_(0, slots, v.to(self.v_pool.dtype))
        b = meta.decode_blocks.flatten()  # index_select copies whole blocks: ~3x aten::index
        kd = self.k_pool.index_select(0, b).view(nd, -1, hkv, d)
        vd = self.v_pool.index_select(0, b).view(nd, -1, hkv, d)
        if meta.decode_len is not None:  # one sequence: cut to its length, no mask needed
            kd, vd = kd[:, : meta.decode_len], vd[:, : meta.decode_len]
        kd, vd = kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype)
        y = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
        return y.squeeze(2)

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, row0: int) -> None:
        """Store the prefill rows' k/v and attend each chunk, causal within the chunk and over
        its cached prefix (chunk rows start at ``c.start - row0`` in these tensors)."""
        meta = self.meta
        _, _, hkv, d = self.k_pool.shape
        slots = meta.slot_mapping[row0:]
        self.k_pool.view(-1, hkv, d).index_copy_(0, slots, k.to(self.k_pool.dtype))
        self.v_pool.view(-1, hkv, d).index_copy_(0, slots, v.to(self.v_pool.dtype))
        for c in meta.prefills:
            r = slice(c.start - row0, c.start - row0 + c.length)
            qc = q[r].transpose(0, 1).unsqueeze(0)
            if c.mask is None:  # no cached prefix: the chunk's own k/v are the whole context
                kc, vc = k[r], v[r]
            else:
                kc = self.k_pool.index_select(0, c.blocks).view(-1, hkv, d)[: c.context].to(q.dtype)
                vc = self.v_pool.index_select(0, c.blocks).view(-1, hkv, d)[: c.context].to(q.dtype)
            kc, vc = kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0)
            y = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None, enable_gqa=True
            )
            out[r] = y[0].transpose(0, 1)
