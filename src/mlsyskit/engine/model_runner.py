"""Turns a scheduled batch into tensors, runs the model, and samples the next tokens.

A step's rows are laid end to end, decodes first. They run through the model's modules and the
paged cache (:meth:`Transformer.forward_tokens`), except that with a :class:`FusedDecoder`
(a quantized Llama-family model) up to ``fused.max_rows`` decode rows take one C call per layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mlsyskit.engine.attention import PagedKVCache, PrefillChunk, StepMeta
from mlsyskit.engine.fused_decode import FusedDecoder
from mlsyskit.engine.sampling import sample
from mlsyskit.engine.sequence import Sequence
from mlsyskit.models.transformer import Transformer


class ModelRunner:
    """Owns the model and (with ``kv_cache=True``) the preallocated paged KV pool."""

    def __init__(self, model: Transformer, kv: PagedKVCache | None, fused: bool = True) -> None:
        self.model = model
        self.kv = kv
        # decode-only steps of a quantized Llama-family model: one C call per layer
        self.fused = FusedDecoder(model, kv) if fused and FusedDecoder.supports(model, kv) else None

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]]) -> list[int | None]:
        """Compute ``n`` new tokens of each sequence; return a sampled token for each sequence
        whose computation reached its last token (``None`` for a prefill chunk mid-prompt)."""
        if self.kv is None:
            return self._step_recompute(batch)
        # Decodes first: they are batched into one attention call per layer.
        order = sorted(range(len(batch)), key=lambda i: batch[i][1] != 1)
        batch = [batch[i] for i in order]
        logits_rows = self._forward(batch)
        tokens = self._sample(batch, logits_rows)
        out: list[int | None] = [None] * len(batch)
        for pos, i in enumerate(order):
            out[i] = tokens[pos]
        return out

    def _forward(self, batch: list[tuple[Sequence, int]]) -> list[Tensor | None]:
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        last_rows: list[int | None] = []
        for seq, n in batch:
            start = seq.num_computed
            end = start + n
            row0 = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                mask = None
                if start > 0:  # attend over the cached prefix too: query at p sees keys <= p
                    mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
                blocks = torch.tensor(table[: -(-end // bs)], dtype=torch.long)
                prefills.append(PrefillChunk(row0, n, end, blocks, mask))
            last_rows.append(row0 + n - 1 if end == len(seq) else None)
        nd = len(decode_tables)
        decode_blocks = decode_mask = decode_len = tables = lens = None
        if nd and self.kv.in_place_decode:  # the compiled kernel walks the block tables itself
            width = max(len(t) for t in decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int32)
            lens = torch.tensor(decode_lens, dtype=torch.int32)
        elif nd == 1:
            decode_blocks = torch.tensor([decode_tables[0][: -(-decode_lens[0] // bs)]], dtype=torch.long)
            decode_len = decode_lens[0]
        elif nd:
            width = max(len(t) for t in decode_tables)
            decode_blocks = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long)
            lens = torch.tensor(decode_lens)
            valid = torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)
            # additive float mask built once per step (a bool mask is converted in every layer)
            decode_mask = torch.zeros(valid.shape, dtype=self.kv.k.dtype).masked_fill_(~valid, float("-inf")).view(nd, 1, 1, -1)
        ids_t, pos_t, slots_t = torch.tensor(ids), torch.tensor(positions), torch.tensor(slots, dtype=torch.long)
        rows = [r for r in last_rows if r is not None]
        if self.fused is not None and 0 < nd <= self.fused.max_rows and not prefills:
            with self.fused.timed():  # a pure decode step: timed for the thread-count tuner
                hidden = self.fused.forward(ids_t, pos_t.int(), slots_t, tables, lens)
                logits = self.model.logits(hidden[rows])
        else:
            if self.fused is not None and 0 < nd <= self.fused.max_rows:
                # Decode rows always take the fused path, whatever else is in the step, so a
                # token's result never depends on its neighbours (quantized activations turn
                # float32 rounding differences into rounding flips); prefills take the modules.
                hidden = self.fused.forward(ids_t[:nd], pos_t[:nd].int(), slots_t[:nd], tables, lens)
                shifted = [dataclasses.replace(c, start=c.start - nd) for c in prefills]
                meta = StepMeta(slots_t[nd:], 0, None, None, shifted)
                hidden = torch.cat((hidden, self._modules_forward(ids_t[nd:], pos_t[nd:], meta)))
            else:
                meta = StepMeta(slots_t, nd, decode_blocks, decode_mask, prefills, decode_len, tables, lens)
                hidden = self._modules_forward(ids_t, pos_t, meta)
            logits = self.model.logits(hidden[rows]) if rows else None
        out: list[Tensor | None] = []
        k = 0
        for r in last_rows:
            out.append(None if r is None else logits[k])
            k += r is not None
        return out

    def _modules_forward(self, ids: Tensor, positions: Tensor, meta: StepMeta) -> Tensor:
        """Hidden states of the step's rows through the model's modules and the paged cache."""
        self.kv.meta = meta
        try:
            return self.model.forward_tokens(ids, positions, self.kv)
        finally:
            self.kv.meta = None

    def _sample(self, batch: list[tuple[Sequence, int]], rows: list[Tensor | None]) -> list[int | None]:
        idx = [i for i, r in enumerate(rows) if r is not None]
        if not idx:
            return [None] * len(batch)
        logits = torch.stack([rows[i] for i in idx])
        seqs = [batch[i][0] for i in idx]
        toks = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        out: list[int | None] = [None] * len(batch)
        for i, t in zip(idx, toks, strict=True):
            out[i] = t
        return out

    def _step_recompute(self, batch: list[tuple[Sequence, int]]) -> list[int | None]:
        """The naive ``kv_cache=False`` mode: rerun every sequence from its first token."""
        rows: list[Tensor | None] = []
        for seq, n in batch:
            if seq.num_computed + n < len(seq):
                rows.append(None)  # a chunk mid-prompt: nothing to keep without a cache
                continue
            logits = self.model(torch.tensor(seq.token_ids).unsqueeze(0))
            rows.append(logits[0, -1])
        return self._sample(batch, rows)
