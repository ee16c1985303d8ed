"""Turns a scheduled batch into tensors, runs the model, and samples the next tokens.

A step's rows are laid end to end, decodes first. They run through the model's modules and the
paged cache (:meth:`Transformer.forward_tokens`), except that with a :class:`FusedDecoder`
(a quantized Llama-family model) up to ``fused.max_rows`` decode rows take one C call per layer.

A speculative verify row (a sequence's pending token and its draft, see
:mod:`mlsyskit.engine.speculative`) becomes one decode row per token, each attending over the
cache up to its own position (the kernels write every row's key/value before any row attends),
and all of them are sampled. So each position is computed by the same kernels as a single-token
decode, activations quantized per row: the integer kernels sum a row's products in one order up
to ``kernels.TILE_ROWS`` (7) rows and in another (lane-wise GEMM) from 8, so with the fused
decoder the decode rows of a step with a draft go through it, and through the quantized head,
in chunks of at most 7 rows, never the lane-wise or dense GEMMs that more rows would pick.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mlsyskit.engine.attention import PagedKVCache, PrefillChunk, StepMeta
from mlsyskit.engine.fused_decode import FusedDecoder, kernel_weight
from mlsyskit.engine.kv_tiers import KVTiers
from mlsyskit.engine.sampling import sample
from mlsyskit.engine.sequence import Sequence
from mlsyskit.engine.speculative import accept
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant import kernels


@dataclasses.dataclass
class StepRow:
    """What one sequence brings to a step, all a process needs to run it (pickled to the
    workers of a parallel engine): its new tokens, the position of the first, its block table,
    and whether the step reaches its last token (its hidden state is sampled); ``verify``: the
    tokens are a pending token and its draft, each a decode row, all sampled."""

    tokens: list[int]
    start: int
    table: list[int]
    last: bool
    verify: bool = False

    @property
    def decode(self) -> bool:
        return len(self.tokens) == 1 or self.verify


def step_rows(batch: list[tuple[Sequence, int]]) -> list[StepRow]:
    """The rows of a scheduled batch (``(sequence, new tokens)`` pairs), in batch order."""
    rows = []
    for seq, n in batch:
        start = seq.num_computed
        if seq.draft:
            rows.append(StepRow([seq.token_ids[start], *seq.draft], start, seq.block_table, True, True))
        else:
            rows.append(StepRow(seq.token_ids[start : start + n], start, seq.block_table, start + n == len(seq)))
    return rows


@dataclasses.dataclass
class StepInputs:
    """A step's tensors: flat token ids, positions and KV slots, the attention metadata (its
    ``slot_mapping`` left empty: :meth:`ModelRunner.hidden` fills it in), and for each row the
    index of its (last) sampled token (``None``: a prefill chunk mid-prompt) and how many of its
    tokens are sampled (more than one: a verify row)."""

    ids: Tensor
    positions: Tensor
    slots: Tensor
    meta: StepMeta
    last_rows: list[int | None]
    num_sampled: list[int]

    @property
    def verify(self) -> bool:
        return any(c > 1 for c in self.num_sampled)

    @property
    def sample_rows(self) -> list[int]:
        return [i for r, c in zip(self.last_rows, self.num_sampled, strict=True) if r is not None
                for i in range(r - c + 1, r + 1)]

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
        # A quantized head runs the integer kernel for every step's rows (see _logits).
        head = model._modules.get("lm_head")
        self.head_qw = kernel_weight(head) if head is not None and head.bias is None else None

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]]) -> list[int | list[int] | None]:
        """Compute ``n`` new tokens of each sequence; return a sampled token for each sequence
        whose computation reached its last token (``None`` for a prefill chunk mid-prompt), the
        accepted tokens (a list) for a sequence with a draft."""
        if self.kv is None:
            return self._step_recompute(batch)
        # Decodes (and drafts) first: they are batched into one attention call per layer.
        order = sorted(range(len(batch)), key=lambda i: batch[i][1] != 1 and not batch[i][0].draft)
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
        out: list[int | list[int] | None] = [None] * len(batch)
        for pos, i in enumerate(order):
            out[i] = tokens[pos]
        return out

    def _forward(self, batch: list[tuple[Sequence, int]]) -> list[Tensor | None]:
        inputs = self.inputs(step_rows(batch))
        rows = inputs.sample_rows
        if self.fused is not None and inputs.pure_decode(self.fused.max_rows):
            with self.fused.timed():  # a pure decode step: timed for the thread-count tuner
                hidden = self.hidden(inputs)
                logits = self._logits(hidden[rows], inputs.verify)
        else:
            hidden = self.hidden(inputs)
            logits = self._logits(hidden[rows], inputs.verify) if rows else None
        out: list[Tensor | None] = []
        k = 0
        for r, c in zip(inputs.last_rows, inputs.num_sampled, strict=True):
            if r is None:
                out.append(None)
                continue
            out.append(logits[k] if c == 1 else logits[k : k + c])
            k += c
        return out

    def _logits(self, hidden: Tensor, verify: bool = False) -> Tensor:
        """Logits of the sampled rows. A quantized head runs the integer kernel whatever the
        row count (the layer itself switches to a dequantized float32 GEMM from 32 rows): a
        step samples at most one row per sequence (a draft's few more), where the kernel is
        faster (measured: see the README's engine section), and each row's logits are then
        the same as in a single-token decode (with drafts, in chunks of ``TILE_ROWS``)."""
        if self.head_qw is None:
            return self.model.logits(hidden)
        h = self.model.norm(hidden)
        if not verify or len(h) <= kernels.TILE_ROWS:
            return kernels.qmatmul(h, self.head_qw)
        step = kernels.TILE_ROWS
        return torch.cat([kernels.qmatmul(h[a : a + step], self.head_qw) for a in range(0, len(h), step)])

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
        num_sampled: list[int] = []
        for row in rows:
            n, start, table = len(row.tokens), row.start, row.table
            end = start + n
            row0 = len(ids)
            ids.extend(row.tokens)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            num_sampled.append(n if row.verify else 1)
            if row.decode:  # a verify row: one decode row per token, each seeing up to itself
                decode_tables.extend([table] * n)
                decode_lens.extend(range(start + 1, end + 1))
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
            last_rows, num_sampled,
        )

    def hidden(self, inputs: StepInputs, x: Tensor | None = None) -> Tensor:
        """Hidden states ``(T, dim)`` of the step's rows after this model's layers; ``x``: the
        layers' input instead of the tokens' embeddings (a pipeline stage after the first)."""
        ids_t, pos_t, slots_t, meta = inputs.ids, inputs.positions, inputs.slots, inputs.meta
        nd = meta.num_decode
        if self.fused is not None and 0 < nd and (nd <= self.fused.max_rows or inputs.verify):
            if self.tiers is not None and self.tiers.pending(meta.decode_tables):
                self.tiers.complete()  # a decode row reads a block still being copied in
            # Decode rows always take the fused path, whatever else is in the step, so a
            # token's result never depends on its neighbours (quantized activations turn
            # float32 rounding differences into rounding flips); prefills take the modules.
            # With drafts, in chunks the integer kernels compute row by row (as for a lone
            # decode row): a chunk's rows see the keys/values earlier chunks wrote.
            mr = min(self.fused.max_rows, kernels.TILE_ROWS) if inputs.verify else self.fused.max_rows
            pos32 = pos_t[:nd].int()
            parts = [self.fused.forward(ids_t[a:b], pos32[a:b], slots_t[a:b], meta.decode_tables[a:b],
                                        meta.decode_lens[a:b], None if x is None else x[a:b])
                     for a, b in ((a, min(a + mr, nd)) for a in range(0, nd, mr))]
            hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
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

    def _sample(self, batch: list[tuple[Sequence, int]], rows: list[Tensor | None]) -> list[int | list[int] | None]:
        out: list[int | list[int] | None] = [None] * len(batch)
        idx = []
        for i, r in enumerate(rows):
            if r is None:
                continue
            if r.dim() == 1:
                idx.append(i)
                continue
            seq = batch[i][0]  # a draft: verified position by position
            if self.logits_log is not None:
                ctx = [*seq.token_ids, *seq.draft]
                self.logits_log.extend((tuple(ctx[: len(seq) + j]), r[j].clone()) for j in range(len(r)))
            out[i] = accept(r, seq.draft, seq.params, seq.generator)
        if not idx:
            return out
        logits = torch.stack([rows[i] for i in idx])
        seqs = [batch[i][0] for i in idx]
        if self.logits_log is not None:  # tests compare the logits of two engines
            self.logits_log.extend((tuple(s.token_ids), row.clone()) for s, row in zip(seqs, logits, strict=True))
        toks = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
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
