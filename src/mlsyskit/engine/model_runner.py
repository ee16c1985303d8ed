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
from mlsyskit.engine.kv_tiers import KVTiers
from mlsyskit.engine.sampling import sample
from mlsyskit.engine.sequence import Sequence
from mlsyskit.models.transformer import Transformer


@dataclasses.dataclass
class StepRow:
    """What one sequence brings to a step, all a process needs to run it (pickled to the
    workers of a parallel engine): its new tokens, the position of the first, its block table,
    and whether the step reaches its last token (its hidden state is sampled)."""

    tokens: list[int]
    start: int
    table: list[int]
    last: bool


def step_rows(batch: list[tuple[Sequence, int]]) -> list[StepRow]:
    """The rows of a scheduled batch (``(sequence, new tokens)`` pairs), in batch order."""
    rows = []
    for seq, n in batch:
        start = seq.num_computed
        rows.append(StepRow(seq.token_ids[start : start + n], start, seq.block_table, start + n == len(seq)))
    return rows


@dataclasses.dataclass
class StepInputs:
    """A step's tensors: flat token ids, positions and KV slots, the attention metadata (its
    ``slot_mapping`` left empty: :meth:`ModelRunner.hidden` fills it in), and for each row the
    index of its sampled token (``None``: a prefill chunk mid-prompt)."""

    ids: Tensor
    positions: Tensor
    slots: Tensor
    meta: StepMeta
    last_rows: list[int | None]

    @property
    def sample_rows(self) -> list[int]:
        return [r for r in self.last_rows if r is not None]

    def pure_decode(self, max_rows: int) -> bool:
        """Only decode rows, few enough for one fused call each layer."""
        return 0 < self.meta.num_decode <= max_rows and not self.meta.prefills


class ModelRunner:
    """Owns the model and (with ``kv_cache=True``) the preallocated paged KV pool."""

    def __init__(self, model: Transformer, kv: PagedKVCache | None, fused: bool = True) -> None:
        self.model = model
        self.kv = kv
        self.logits_log: list[tuple[tuple[int, ...], Tensor]] | None = None  # a list: (tokens, logits) of each sample
        self.tiers: KVTiers | None = None  # KV tiers: their staged loads are copied in during the step
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
        if self.tiers is not None:  # blocks back from a tier: copied layer by layer meanwhile
            self.tiers.start()
            try:
                logits_rows = self._forward(batch)
            finally:
                self.tiers.complete()
        else:
            logits_rows = self._forward(batch)
        tokens = self._sample(batch, logits_rows)
        out: list[int | None] = [None] * len(batch)
        for pos, i in enumerate(order):
            out[i] = tokens[pos]
        return out

    def _forward(self, batch: list[tuple[Sequence, int]]) -> list[Tensor | None]:
        inputs = self.inputs(step_rows(batch))
        rows = inputs.sample_rows
        if self.fused is not None and inputs.pure_decode(self.fused.max_rows):
            with self.fused.timed():  # a pure decode step: timed for the thread-count tuner
                hidden = self.hidden(inputs)
                logits = self.model.logits(hidden[rows])
        else:
            hidden = self.hidden(inputs)
            logits = self.model.logits(hidden[rows]) if rows else None
        out: list[Tensor | None] = []
        k = 0
        for r in inputs.last_rows:
            out.append(None if r is None else logits[k])
            k += r is not None
        return out

    def inputs(self, rows: list[StepRow]) -> StepInputs:
        """The step's tensors (token ids, positions, slots, attention metadata), decodes first."""
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        last_rows: list[int | None] = []
        for row in rows:
            n, start, table = len(row.tokens), row.start, row.table
            end = start + n
            row0 = len(ids)
            ids.extend(row.tokens)
            positions.extend(range(start, end))
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
            last_rows.append(row0 + n - 1 if row.last else None)
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
        return StepInputs(
            torch.tensor(ids), torch.tensor(positions), torch.tensor(slots, dtype=torch.long),
            StepMeta(torch.empty(0, dtype=torch.long), nd, decode_blocks, decode_mask, prefills, decode_len, tables, lens),
            last_rows,
        )

    def hidden(self, inputs: StepInputs, x: Tensor | None = None) -> Tensor:
        """Hidden states ``(T, dim)`` of the step's rows after this model's layers; ``x``: the
        layers' input instead of the tokens' embeddings (a pipeline stage after the first)."""
        ids_t, pos_t, slots_t, meta = inputs.ids, inputs.positions, inputs.slots, inputs.meta
        nd = meta.num_decode
        if self.fused is not None and 0 < nd <= self.fused.max_rows:
            if self.tiers is not None and self.tiers.pending(meta.decode_tables):
                self.tiers.complete()  # a decode row reads a block still being copied in
            # Decode rows always take the fused path, whatever else is in the step, so a
            # token's result never depends on its neighbours (quantized activations turn
            # float32 rounding differences into rounding flips); prefills take the modules.
            hidden = self.fused.forward(ids_t[:nd], pos_t[:nd].int(), slots_t[:nd], meta.decode_tables,
                                        meta.decode_lens, None if x is None else x[:nd])
            if not meta.prefills:
                return hidden
            shifted = [dataclasses.replace(c, start=c.start - nd) for c in meta.prefills]
            rest = StepMeta(slots_t[nd:], 0, None, None, shifted)
            tail = self._modules_forward(ids_t[nd:], pos_t[nd:], rest, None if x is None else x[nd:])
            return torch.cat((hidden, tail))
        return self._modules_forward(ids_t, pos_t, dataclasses.replace(meta, slot_mapping=slots_t), x)

    def _modules_forward(self, ids: Tensor, positions: Tensor, meta: StepMeta, x: Tensor | None = None) -> Tensor:
        """Hidden states of the step's rows through the model's modules and the paged cache."""
        self.kv.meta = meta
        kv = self.kv if self.tiers is None else _TierWaitKV(self.kv, self.tiers)
        try:
            if x is not None:
                return self.model.forward_hidden(x, positions, kv)
            return self.model.forward_tokens(ids, positions, kv)
        finally:
            self.kv.meta = None

    def _sample(self, batch: list[tuple[Sequence, int]], rows: list[Tensor | None]) -> list[int | None]:
        idx = [i for i, r in enumerate(rows) if r is not None]
        if not idx:
            return [None] * len(batch)
        logits = torch.stack([rows[i] for i in idx])
        seqs = [batch[i][0] for i in idx]
        if self.logits_log is not None:  # tests compare the logits of two engines
            self.logits_log.extend((tuple(s.token_ids), row.clone()) for s, row in zip(seqs, logits, strict=True))
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


class _TierWaitKV:
    """The paged cache as the model sees it while tier loads are copied in: layer ``i`` is
    handed out once its blocks are in the pool."""

    def __init__(self, kv: PagedKVCache, tiers: KVTiers) -> None:
        self.kv, self.tiers = kv, tiers

    def layer(self, i: int) -> object:
        self.tiers.wait_layer(i)
        return self.kv.layer(i)
