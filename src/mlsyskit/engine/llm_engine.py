"""The engine loop: requests in, one scheduled model step at a time, outputs (and deltas) out.

``add_request`` / ``step`` / ``abort`` is the interface a server drives; :class:`~mlsyskit.engine.llm.LLM`
wraps it for offline use.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from mlsyskit.engine.attention import PagedKVCache
from mlsyskit.engine.block_manager import BlockManager
from mlsyskit.engine.kv_cost import SwapPolicy, measure_copy_bandwidth
from mlsyskit.engine.kv_tiers import KVTiers, check_options, model_identity
from mlsyskit.engine.model_runner import ModelRunner
from mlsyskit.engine.outputs import RequestOutput
from mlsyskit.engine.parallel import Group, ParallelRunner, wrap_tensor_parallel
from mlsyskit.engine.sampling import SamplingParams
from mlsyskit.engine.scheduler import BATCHING, Scheduler
from mlsyskit.engine.sequence import Sequence, Status
from mlsyskit.engine.settings import EngineSettings
from mlsyskit.engine.speculative import make_proposer
from mlsyskit.errors import UserError
from mlsyskit.models.tokenizer import IncrementalDecoder
from mlsyskit.models.transformer import build_transformer
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import BlockLinear, QuantLinear, quantized_linear, set_prefill_dtype
from mlsyskit.runtime import keep_freed_memory

if TYPE_CHECKING:
    from mlsyskit.models.checkpoint import Checkpoint

DEFAULT_KV_BYTES = 1 << 30  # KV pool budget when num_kv_blocks is not given


class _Request:
    def __init__(self, seq: Sequence, out: RequestOutput, detok: IncrementalDecoder) -> None:
        self.seq, self.out, self.detok = seq, out, detok
        self.emitted = 0  # characters of out.text already streamed


class LLMEngine:
    """Continuous-batching engine over a paged KV cache (see the module docs of ``scheduler``)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        settings: EngineSettings | None = None,
        *,
        parallel: Group | None = None,
        **options: Any,
    ) -> None:
        """``settings`` (default: :class:`EngineSettings`'s defaults) with any of its fields
        replaced by keyword (``LLMEngine(ckpt, max_num_seqs=8)``); ``parallel``: this rank's group."""
        s = EngineSettings.build(settings, **options).resolved()
        if s.batching not in BATCHING:
            raise UserError(f"unknown batching {s.batching!r}; use one of {', '.join(BATCHING)}")
        check_options(s.kv_offload, s.kv_offload_gib, s.kv_disk_gib, s.kv_offload_dir, s.preemption, s.kv_cache)
        cfg = checkpoint.config
        self.config = cfg
        self.tokenizer = checkpoint.tokenizer
        self.max_model_len = min(s.max_model_len or cfg.max_seq_len, cfg.max_seq_len)
        if not s.paged:  # one contiguous region per sequence: a "block" is a whole context
            s = dataclasses.replace(s, block_size=self.max_model_len, prefix_caching=False)
        for name, v in (("block_size", s.block_size), ("max_num_batched_tokens", s.max_num_batched_tokens),
                        ("max_prefill_tokens", s.max_prefill_tokens), ("max_num_seqs", s.max_num_seqs)):
            if v < 1:
                raise UserError(f"{name} must be positive, got {v}")
        mcfg, weights = cfg, checkpoint.state_dict
        if parallel is not None:  # this rank's shard: its layers; with TP its heads and MLP columns
            mcfg, weights = parallel.placement.shard(cfg, weights)
        self.model = build_transformer(mcfg, weights, s.dtype, quantized_linear=quantized_linear)
        if parallel is not None:
            wrap_tensor_parallel(self.model, parallel)
        if s.quantization is not None:
            from mlsyskit.quant.linear import parse_quantization, quantize_

            if any(isinstance(m, (QuantLinear, BlockLinear)) for m in self.model.modules()):
                # quantize_ only replaces float layers: it would silently keep the stored scheme
                raise UserError(
                    f"{checkpoint.source} is already quantized; leave out --quantization "
                    "(quantization=) or quantize the original model"
                )
            quantize_(self.model, parse_quantization(s.quantization))
        # quantized layers: dense prefill GEMMs in bf16 where the CPU has it (AMX / AVX-512 BF16)
        set_prefill_dtype(self.model, torch.bfloat16 if kernels.native_bf16() else torch.float32)
        if isinstance(getattr(self.model, "lm_head", None), torch.nn.Module):
            # logits stay float32: bf16 outputs (0.125 apart near 25) made exact ties of near ones
            set_prefill_dtype(self.model.lm_head, torch.float32)
        keep_freed_memory()  # dense prefill weights, logits: reuse freed memory, no page faults
        if s.kv_dtype is None:  # quantized models keep their KV in fp16, as llama.cpp does
            quantized = any(getattr(m, "_qw", None) is not None for m in self.model.modules())
            s = dataclasses.replace(s, kv_dtype=torch.float16 if quantized and s.dtype == torch.float32 else s.dtype)
        self.kv_dtype = s.kv_dtype
        self.kv_cache = None
        self.block_manager = None
        self.kv_tiers: KVTiers | None = None
        swap_policy = None
        if s.kv_cache:
            per_block = PagedKVCache.bytes_per_block(cfg.n_layers, s.block_size, cfg.n_kv_heads, cfg.head_dim, s.kv_dtype)
            if s.num_kv_blocks is None:
                full = -(-self.max_model_len // s.block_size)
                want = s.max_num_seqs * full
                s = dataclasses.replace(s, num_kv_blocks=max(full, min(want, DEFAULT_KV_BYTES // per_block)))
            if s.num_kv_blocks < 1:
                raise UserError(f"num_kv_blocks must be positive, got {s.num_kv_blocks}")
            # the same block count on every rank; each holds its layers' and KV heads' part
            self.kv_cache = PagedKVCache(mcfg.n_layers, s.num_kv_blocks, s.block_size, mcfg.n_kv_heads, cfg.head_dim, s.kv_dtype)
            if s.kv_offload is not None:
                identity = model_identity(checkpoint.source, cfg.to_dict(), {
                    "file_type": checkpoint.file_type, "dtype": str(s.dtype), "kv_dtype": str(s.kv_dtype),
                    "quantization": s.quantization, "block_size": s.block_size,
                })
                self.kv_tiers = KVTiers(
                    self.kv_cache.k, self.kv_cache.v, host_bytes=s.kv_offload_gib * 2**30, identity=identity,
                    block_size=s.block_size, disk_dir=s.kv_offload_dir if s.kv_offload == "disk" else None,
                    disk_bytes=s.kv_disk_gib * 2**30, prefix=s.kv_tier_prefix and s.prefix_caching,
                    prefetch=s.kv_prefetch,
                )
                if s.preemption != "recompute":
                    swap_policy = SwapPolicy(s.preemption, per_block / s.block_size, measure_copy_bandwidth())
            self.block_manager = BlockManager(s.num_kv_blocks, s.block_size, s.prefix_caching, self.kv_tiers)
        # speculative decoding (prompt lookup): checked before the model is built
        self.proposer = make_proposer(s.speculative, s.num_speculative_tokens, s.ngram_max, s.ngram_min)
        if self.proposer is not None and (parallel is not None or not s.kv_cache):
            raise UserError("speculative decoding needs the KV cache and one process "
                            "(not kv_cache=False, tensor or pipeline parallel)")
        self.settings = s  # as built: dtypes resolved, block count and KV dtype filled in
        self.scheduler = Scheduler(
            self.block_manager, batching=s.batching, max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens, max_prefill_tokens=s.max_prefill_tokens,
            swap_policy=swap_policy, proposer=self.proposer, max_model_len=self.max_model_len,
        )
        if parallel is not None:
            self.runner: ModelRunner = ParallelRunner(self.model, self.kv_cache, parallel)
        else:
            self.runner = ModelRunner(self.model, self.kv_cache)
            self.runner.tiers = self.kv_tiers  # loads staged by the scheduler are copied during the step
        self.requests: dict[str, _Request] = {}
        self.eos_ids = set(self.tokenizer.eos_ids)
        self.num_steps = 0
        self.tokens_computed = 0

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            raise UserError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise UserError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(at least one must be left to generate)"
            )
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        seq = Sequence(ids, params, request_id)
        if seq.request_id in self.requests:
            raise UserError(f"request id {seq.request_id!r} is already in use")
        if self.block_manager is not None:
            need = self.block_manager.blocks_needed(min(len(ids) + params.max_tokens, self.max_model_len))
            if need > self.block_manager.num_blocks:
                raise UserError(
                    f"this request needs {need} KV blocks but the pool has {self.block_manager.num_blocks}; "
                    "raise num_kv_blocks or lower max_tokens"
                )
        out = RequestOutput(seq.request_id, ids, arrival_time=time.perf_counter())
        self.requests[seq.request_id] = _Request(seq, out, self.tokenizer.incremental_decoder())
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks (a client went away)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(req.seq)
        req.seq.status = Status.FINISHED
        req.out.finish_reason = "abort"
        req.out.finish_time = time.perf_counter()
        return req.out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one model step; return the outputs of requests that produced text or finished."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        t0 = time.perf_counter()
        tokens = self.runner.step(batch)
        policy = self.scheduler.swap_policy
        if policy is not None and all(n > 1 and not s.draft for s, n in batch):  # a pure prefill step: its rate
            policy.observe_prefill(sum(n for _, n in batch), time.perf_counter() - t0)
        self.num_steps += 1
        now = time.perf_counter()
        updated: list[RequestOutput] = []
        for (seq, n), tok in zip(batch, tokens, strict=True):
            self.tokens_computed += n
            if isinstance(tok, list):  # a verified draft: KV kept for the pending token and the accepted ones
                self.proposer.record(len(seq.draft), len(tok) - 1)
                n = len(tok)
                self.block_manager.shrink(seq, seq.num_computed + n + 1)
            seq.draft = []
            seq.num_computed += n
            if self.block_manager is not None:
                self.block_manager.commit(seq)
            if tok is None:
                continue
            req = self.requests[seq.request_id]
            updated.append(self._append(req, tok if isinstance(tok, list) else [tok], now))
        return updated

    def _append(self, req: _Request, toks: list[int], now: float) -> RequestOutput:
        """Append a step's tokens (several after a verified draft) until one finishes the request."""
        seq, out, p = req.seq, req.out, req.seq.params
        out.delta, out.delta_token_ids = "", []
        if out.first_token_time is None:
            out.first_token_time = now
        reason, truncated = None, False
        for tok in toks:
            if tok in self.eos_ids and not p.ignore_eos:
                reason = "stop"
                break
            seq.token_ids.append(tok)
            out.token_ids.append(tok)
            out.delta_token_ids.append(tok)
            old_len = len(out.text)
            out.text += req.detok.push(tok)
            if p.stop:  # only where the new text could complete a stop string
                lo = max(0, old_len - max(map(len, p.stop)) + 1)
                hits = [i for i in (out.text.find(s, lo) for s in p.stop) if i >= 0]
                if hits:
                    out.text = out.text[: min(hits)]
                    reason, truncated = "stop", True
                    break
            if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
                break
        if reason and not truncated:
            out.text += req.detok.flush()  # bytes held back for a character that never completed
        hold = 0 if reason or not p.stop else max(map(len, p.stop)) - 1
        end = max(req.emitted, len(out.text) - hold)
        out.delta = out.text[req.emitted : end]
        req.emitted = end
        out.num_prefix_cached_tokens = max(out.num_prefix_cached_tokens, seq.num_prefix_cached)
        out.num_preemptions = seq.num_preemptions
        if reason:
            out.finish_reason = reason
            out.finish_time = now
            seq.status = Status.FINISHED
            self.scheduler.finish(seq)
            del self.requests[seq.request_id]
        # A snapshot: the caller may keep it while the request goes on changing.
        return dataclasses.replace(out, token_ids=list(out.token_ids))

    def kv_usage(self) -> dict[str, float]:
        """Block-pool accounting (empty without a KV cache); with KV tiers also ``tier_*``:
        blocks per tier, bytes moved each way, hit rates per tier, seconds spent copying."""
        out = self.block_manager.usage() if self.block_manager is not None else {}
        if out:
            out["preemptions"] = self.scheduler.num_preemptions
            out["preemptions_swapped"] = self.scheduler.num_swaps
        return out

    def spec_stats(self) -> dict[str, float]:
        """Speculative decoding's counters (see :meth:`NgramProposer.stats`); empty when off."""
        return {} if self.proposer is None else self.proposer.stats()

    def kv_tier_stats(self) -> dict[str, float]:
        """The tiers' counters only (cheap: no walk over the pool's blocks); empty without tiers."""
        if self.kv_tiers is None:
            return {}
        return {**self.kv_tiers.usage(), "preemptions": self.scheduler.num_preemptions,
                "preemptions_swapped": self.scheduler.num_swaps}

    def close(self) -> None:
        """Write the pool's cached prefix blocks to the disk tier (so a restart finds them) and
        wait for every queued write; a no-op without a disk tier."""
        if self.kv_tiers is None or self.kv_tiers.disk is None:
            return
        for b in self.block_manager.blocks:
            if b.key is not None and b.hash is not None:
                self.kv_tiers.persist(b.block_id, b.key, b.token_ids)
        self.kv_tiers.flush()
