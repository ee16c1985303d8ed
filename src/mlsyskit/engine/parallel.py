"""Tensor and pipeline parallel inference: which shard a rank holds, how the ranks talk, and the
runner that drives (rank 0) or serves (the other ranks) each step.

Ranks are laid out stage-major: rank ``stage * tp + tp_rank``.

- **Tensor parallel** (Megatron): within a stage, rank ``t`` holds the query heads of its share
  of the KV heads (GQA groups stay whole: SmolLM2's 3 KV heads over 2 ranks are 2 + 1), the
  same share of the MLP's intermediate columns, and its KV heads' part of the KV pool. The
  q/k/v and gate/up rows are split, the output and down projections' columns, and one
  all-reduce after each of those two sums the partial results (their bias is added on
  ``t == 0`` only). A GGUF block weight is split along whole 32-value blocks (a split that
  would cut one is refused with a clear error).
- **Pipeline parallel**: stage ``s`` holds a contiguous range of layers (and of the KV pool).
  A step's sequences are dealt into ``pp`` micro-batches; stage ``s`` sends micro-batch ``m``
  on while it computes ``m + 1``, so the stages overlap. The last stage sends the hidden
  states of the rows to sample back to rank 0, which projects them to logits and samples.
- The scheduler runs on rank 0 only; each step it broadcasts the micro-batches'
  :class:`~mlsyskit.engine.model_runner.StepRow` s (tokens, positions, block tables, which rows
  to sample), pickled. Every rank builds the step's tensors from them with the same code.

Groups are gloo process groups over one TCP store (no global ``torch.distributed`` state, so
several engines can live in one process): a control group with no practical timeout (an
idle worker waits on it for the next step) and data groups (the all-reduces, the
stage-to-stage sends) with ``timeout`` seconds. A peer that dies closes its sockets, so a
collective fails at once; :class:`Group` turns that into one line naming the dead rank.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mlsyskit.engine.attention import PagedKVCache
from mlsyskit.engine.model_runner import ModelRunner, StepRow, step_rows
from mlsyskit.engine.sequence import Sequence
from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.gguf_loader import BLOCK, BlockTensor, BlockWeight
from mlsyskit.models.transformer import Transformer
from mlsyskit.runtime import released_by_collectives

IDLE_TIMEOUT = timedelta(days=7)  # the control group: workers wait on it between steps


class WorkerError(RuntimeError):
    """A worker process died or stopped answering; the parallel engine is closed."""


def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part ``i`` of ``range(n)`` cut into ``parts`` near-equal contiguous pieces."""
    base, extra = divmod(n, parts)
    lo = i * base + min(i, extra)
    return lo, lo + base + (i < extra)


@dataclass(frozen=True)
class Placement:
    """Where rank ``rank`` sits among ``tp`` x ``pp`` ranks, and what it holds of a model."""

    tp: int
    pp: int
    rank: int = 0

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def at(self, rank: int) -> Placement:
        return dataclasses.replace(self, rank=rank)

    def layers(self, n_layers: int) -> range:
        return range(*_split(n_layers, self.pp, self.stage))

    def kv_heads(self, cfg: TransformerConfig) -> tuple[int, int]:
        return _split(cfg.n_kv_heads, self.tp, self.tp_rank)

    def hidden_cols(self, cfg: TransformerConfig) -> tuple[int, int]:
        """This rank's MLP intermediate columns: whole 32-blocks when the width allows."""
        unit = BLOCK if cfg.hidden_dim % BLOCK == 0 else 1
        lo, hi = _split(cfg.hidden_dim // unit, self.tp, self.tp_rank)
        return lo * unit, hi * unit

    def check(self, cfg: TransformerConfig, state_dict: dict[str, Any], quantization: str | None = None) -> None:
        """Raise UserError if the model cannot be split this way (checked for every rank)."""
        for name, v in (("tensor_parallel_size", self.tp), ("pipeline_parallel_size", self.pp)):
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if self.tp > cfg.n_kv_heads:
            raise UserError(
                f"tensor_parallel_size={self.tp} exceeds the model's {cfg.n_kv_heads} KV heads "
                "(each rank holds whole KV heads)"
            )
        if self.pp > cfg.n_layers:
            raise UserError(f"pipeline_parallel_size={self.pp} exceeds the model's {cfg.n_layers} layers")
        if self.tp == 1:
            return
        if quantization is not None:
            raise UserError(
                "tensor parallel with quantization= is not supported (scales fitted per shard would "
                "change the model); quantize the model first or use pipeline parallel"
            )
        blocks = any(isinstance(v, BlockWeight) for v in state_dict.values())
        other = [k for k, v in state_dict.items() if not isinstance(v, (Tensor, BlockWeight))]
        if other:
            raise UserError(
                f"tensor parallel cannot split {other[0]} ({type(state_dict[other[0]]).__name__}); "
                "use the GGUF file, float weights, or pipeline parallel"
            )
        if blocks:
            for r in range(self.tp):
                p = self.at(r)
                k0, k1 = p.kv_heads(cfg)
                g = cfg.n_heads // cfg.n_kv_heads
                for what, lo, hi in (("attention output", k0 * g * cfg.head_dim, k1 * g * cfg.head_dim),
                                     ("MLP down", *p.hidden_cols(cfg))):
                    if lo % BLOCK or hi % BLOCK:
                        raise UserError(
                            f"tensor_parallel_size={self.tp} would split a {BLOCK}-value quantization block of "
                            f"the {what} projection (rank {r}: input columns {lo}..{hi}); pick another size "
                            "or load with dtype='float32'"
                        )

    def shard(self, cfg: TransformerConfig, state_dict: dict[str, Any]) -> tuple[TransformerConfig, dict[str, Any]]:
        """This rank's config and state dict: its layers (renumbered from 0) and, with
        ``tp > 1``, its heads and MLP columns. Embedding, final norm and head are kept whole."""
        layers = self.layers(cfg.n_layers)
        hd, g = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        k0, k1 = self.kv_heads(cfg)
        h0, h1 = self.hidden_cols(cfg)
        local = dataclasses.replace(
            cfg, n_layers=len(layers), n_heads=(k1 - k0) * g, n_kv_heads=k1 - k0, hidden_dim=h1 - h0, head_dim=hd
        )
        nq, nkv, hid = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.hidden_dim
        qkv_rows = np.concatenate([
            np.arange(k0 * g * hd, k1 * g * hd), nq + np.arange(k0 * hd, k1 * hd), nq + nkv + np.arange(k0 * hd, k1 * hd)
        ])
        rows = {"attn.qkv": qkv_rows, "ffn.gate_up": np.concatenate([np.arange(h0, h1), hid + np.arange(h0, h1)]),
                "ffn.up": np.arange(h0, h1)}
        cols = {"attn.o_proj": (k0 * g * hd, k1 * g * hd), "ffn.down": (h0, h1)}
        out: dict[str, Any] = {}
        for name, v in state_dict.items():
            if not name.startswith("layers."):
                out[name] = v
                continue
            _, i, rest = name.split(".", 2)
            if int(i) not in layers:
                continue
            key = f"layers.{int(i) - layers.start}.{rest}"
            if self.tp > 1:
                module, _, kind = rest.rpartition(".")
                if module in rows:
                    v = _take_rows(v, rows[module])
                elif module in cols and kind == "weight":
                    v = _take_cols(v, *cols[module])
                elif module in cols and self.tp_rank:  # a row-parallel bias is added once
                    v = torch.zeros_like(v)
            out[key] = v
        return local, out


def _take_rows(v: Tensor | BlockWeight, rows: np.ndarray) -> Tensor | BlockWeight:
    """Output rows ``rows`` (sorted) of a weight or bias."""
    if isinstance(v, Tensor):
        return v.index_select(0, torch.from_numpy(rows)).contiguous()
    parts, start = [], 0
    for p in v.parts:  # each part covers output rows start..start+p.rows, stored in perm order
        out_rows = start + (np.arange(p.rows) if p.perm is None else p.perm.astype(np.int64))
        keep = np.nonzero(np.isin(out_rows, rows))[0]
        start += p.rows
        if not len(keep):
            continue
        new = np.searchsorted(rows, out_rows[keep])
        new -= new.min()
        ordered = bool(np.all(new == np.arange(len(new))))
        contiguous = keep[-1] - keep[0] + 1 == len(keep)
        data = p.data[keep[0] : keep[-1] + 1] if contiguous else p.data[keep]
        parts.append(BlockTensor(p.qtype, data, None if ordered else new.astype(np.int32)))
    return BlockWeight(tuple(parts), (len(rows), v.shape[1]))


def _take_cols(v: Tensor | BlockWeight, lo: int, hi: int) -> Tensor | BlockWeight:
    """Input columns ``lo..hi`` of a weight (whole blocks of a block weight; a K-quant's
    256-value super-blocks that the split would cut are dequantized to float32 instead)."""
    if isinstance(v, Tensor):
        return v[:, lo:hi].contiguous()
    if any(lo % p.block_values or hi % p.block_values for p in v.parts):
        return v.dequantize()[:, lo:hi].contiguous()
    parts = tuple(
        BlockTensor(p.qtype, np.ascontiguousarray(p.data[:, lo // p.block_values * p.block_bytes : hi // p.block_values * p.block_bytes]), p.perm)
        for p in v.parts
    )
    return BlockWeight(parts, (v.shape[0], hi - lo))


@dataclass
class CommStats:
    """What rank 0 spent on communication (seconds include waiting for slower peers)."""

    allreduce_calls: int = 0
    allreduce_bytes: int = 0
    allreduce_s: float = 0.0
    p2p_bytes: int = 0  # sent and received between stages
    p2p_s: float = 0.0
    step_bytes: int = 0  # pickled step plans broadcast
    step_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


SHM_CHUNK = 1 << 20  # floats per rank per round of the shared-memory all-reduce (4 MiB)
ALLREDUCE = ("shm", "gloo")


class SharedSum:
    """The TP all-reduce for ranks on one host, through shared memory instead of sockets.

    Every rank copies its partial sum into its slot, raises its flag, spins until every flag is
    up, sums the slots in rank order (so every rank gets the same bits), and raises its flag
    again once done reading, before the slot may be reused. A gloo all-reduce of a few KB costs
    ~1 ms here (thread wake-ups); this costs a few microseconds a phase. While spinning it
    checks, every few thousand turns, that its peers are alive and the timeout has not passed.
    """

    def __init__(self, slots: Tensor, flags: Tensor, placement: Placement, timeout: float,
                 peer_dead: Callable[[], str | None]) -> None:
        self.slots = slots[placement.stage]  # (tp, SHM_CHUNK)
        self.flags = flags[placement.stage]  # (tp,)
        self.rank = placement.tp_rank
        self.timeout = timeout
        self.peer_dead = peer_dead
        self.seq = int(self.flags[self.rank])

    @staticmethod
    def allocate(placement: Placement) -> tuple[Tensor, Tensor]:
        """The shared buffers for every stage's TP group (rank 0 hands them to the workers)."""
        slots = torch.zeros(placement.pp, placement.tp, SHM_CHUNK).share_memory_()
        return slots, torch.zeros(placement.pp, placement.tp, dtype=torch.int64).share_memory_()

    def __call__(self, t: Tensor) -> None:
        flat = t.view(-1)
        for lo in range(0, flat.numel(), SHM_CHUNK):
            part = flat[lo : lo + SHM_CHUNK]
            k = part.numel()
            self.slots[self.rank, :k].copy_(part)
            self._phase()  # every partial written
            part.copy_(self.slots[:, :k].sum(0))
            self._phase()  # every rank done reading

    def _phase(self) -> None:
        self.seq += 1
        self.flags[self.rank] = self.seq
        spins, deadline = 0, None
        while int(self.flags.min()) < self.seq:
            spins += 1
            if spins % 64 == 0:
                os.sched_yield()  # a shared machine: let a descheduled peer run
            if spins % 4096 == 0:
                dead = self.peer_dead()
                if dead:
                    raise RuntimeError(dead)
                deadline = deadline or time.monotonic() + self.timeout
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shared-memory all-reduce timed out after {self.timeout:g} s")


class Group:
    """This rank's process groups over ``store`` (every rank constructs them in this order)."""

    def __init__(self, store: dist.Store, placement: Placement, timeout: float, loopback: bool = True,
                 procs: list[Any] | None = None, shm: tuple[Tensor, Tensor] | None = None) -> None:
        self.placement = placement
        self.store = store
        self.timeout = timeout
        self.procs = procs or []  # rank 0 of a spawned group: the workers (rank = index + 1)
        self.stats = CommStats()
        self.closed = False
        self.failure: str | None = None
        p, data_timeout = placement, timedelta(seconds=timeout)

        def group(prefix: str, rank: int, size: int, t: timedelta) -> dist.ProcessGroupGloo:
            if not loopback:
                return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, t)
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = t
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, opts)

        self.ctl = group("ctl", p.rank, p.world, IDLE_TIMEOUT)
        self.data = group("data", p.rank, p.world, data_timeout)
        self.tp_group = group(f"tp{p.stage}", p.tp_rank, p.tp, data_timeout) if p.tp > 1 else None
        self.shm = None  # the TP all-reduce through shared memory (spawned ranks), else gloo
        if shm is not None and p.tp > 1:
            ppid = os.getppid()
            orphaned = f"rank 0 (pid {ppid}) is gone"
            dead = self.dead_worker if p.rank == 0 else (lambda: orphaned if os.getppid() != ppid else None)
            self.shm = SharedSum(*shm, p, timeout, dead)

    # -- collectives --------------------------------------------------------------------------
    def all_reduce(self, t: Tensor) -> None:
        t0 = time.perf_counter()
        if self.shm is not None:
            self.shm(t)
        else:
            self.tp_group.allreduce([t]).wait()
        s = self.stats
        s.allreduce_s += time.perf_counter() - t0
        s.allreduce_calls += 1
        s.allreduce_bytes += t.nbytes

    def send(self, t: Tensor, dst: int) -> Callable[[], None]:
        """Start sending ``t`` (keep it unchanged); returns the wait."""
        work = self.data.send([t], dst, 0)
        self.stats.p2p_bytes += t.nbytes

        def wait() -> None:
            t0 = time.perf_counter()
            work.wait()
            self.stats.p2p_s += time.perf_counter() - t0

        return wait

    def recv(self, t: Tensor, src: int) -> Tensor:
        t0 = time.perf_counter()
        self.data.recv([t], src, 0).wait()
        self.stats.p2p_s += time.perf_counter() - t0
        self.stats.p2p_bytes += t.nbytes
        return t

    def broadcast_obj(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj`` to every rank; the others return it."""
        t0 = time.perf_counter()
        root = self.placement.rank == 0
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if root else b""
        n = torch.tensor([len(payload)], dtype=torch.int64)
        self.ctl.broadcast([n], dist.BroadcastOptions()).wait()
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if root else torch.empty(int(n), dtype=torch.uint8)
        self.ctl.broadcast([buf], dist.BroadcastOptions()).wait()
        released_by_collectives(n, buf)
        self.stats.step_s += time.perf_counter() - t0
        self.stats.step_bytes += int(n)
        return obj if root else pickle.loads(buf.numpy().tobytes())

    # -- rank 0: the workers' health and shutdown -----------------------------------------------
    def dead_worker(self) -> str | None:
        """A line naming a worker that has exited (spawned groups only), else None."""
        for r, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None:
                return f"parallel worker rank {r} (pid {proc.pid}) exited with code {proc.exitcode}"
        return None

    def check(self) -> None:
        """Raise WorkerError if the group failed, was closed, or a worker has exited."""
        if self.failure is not None:
            raise WorkerError(self.failure)
        if self.closed:
            raise WorkerError("this parallel LLM is closed")
        dead = self.dead_worker()
        if dead:
            self.fail(dead)

    def fail(self, why: str) -> None:
        """Close the group and raise WorkerError with ``why``."""
        self.failure = f"{why}; the parallel engine is closed"
        self.close()
        raise WorkerError(self.failure)

    def explain(self, e: BaseException) -> None:
        """Turn a failed collective into WorkerError naming the dead worker if there is one."""
        deadline = time.monotonic() + 2.0  # the dead process may not have been reaped yet
        dead = self.dead_worker()
        while dead is None and self.procs and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = self.dead_worker()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        self.fail(dead or f"a parallel collective failed ({first})")

    def close(self, join_s: float = 10.0) -> None:
        """Stop the workers (rank 0): tell them to stop, then join, terminate, kill."""
        if self.closed:
            return
        self.closed = True
        if self.placement.rank != 0:
            return
        if self.failure is None:
            try:
                self.broadcast_obj(("stop", None))
            except Exception:  # noqa: BLE001 - a worker already gone: the joins below clean up
                pass
        deadline = time.monotonic() + join_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)


class AllReduce(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the TP group."""

    def __init__(self, inner: nn.Module, group: Group) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x).contiguous()
        self.group.all_reduce(y)
        return y


def wrap_tensor_parallel(model: Transformer, group: Group) -> Transformer:
    """Put the all-reduce after each layer's output and down projections."""
    if group.placement.tp > 1:
        for layer in model.layers:
            layer.attn.o_proj = AllReduce(layer.attn.o_proj, group)
            layer.ffn.down = AllReduce(layer.ffn.down, group)
    return model


def micro_batches(rows: list[StepRow], n: int) -> list[list[int]]:
    """Indices of ``rows`` dealt into up to ``n`` micro-batches of near-equal token counts,
    decodes first within each (the order :meth:`ModelRunner.inputs` expects)."""
    n = max(1, min(n, len(rows)))
    groups: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens)):
        g = min(range(n), key=loads.__getitem__)
        groups[g].append(i)
        loads[g] += len(rows[i].tokens)
    return [sorted(g, key=lambda i: (len(rows[i].tokens) != 1, i)) for g in groups if g]


class ParallelRunner(ModelRunner):
    """A :class:`ModelRunner` over this rank's shard (its layers, heads, KV pool). On rank 0,
    :meth:`step` drives every rank; on the others :meth:`serve` runs what rank 0 sends."""

    def __init__(self, model: Transformer, kv: PagedKVCache | None, group: Group) -> None:
        if kv is None:
            raise UserError("parallel inference needs the KV cache (kv_cache=True)")
        super().__init__(model, kv)
        self.group = group
        self.placement = group.placement
        self.act_dtype = model.norm.weight.dtype  # the layers' input dtype after the first stage

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]]) -> list[int | None]:
        group = self.group
        group.check()
        rows = step_rows(batch)
        order = micro_batches(rows, self.placement.pp)
        plan = [[rows[i] for i in mb] for mb in order]
        try:
            group.broadcast_obj(("step", plan))
            hidden = self.run(plan)
        except WorkerError:
            raise
        except RuntimeError as e:  # a peer died or timed out mid-step
            group.explain(e)
        flat = [i for mb, h in zip(order, plan, strict=True) for i, row in zip(mb, h, strict=True) if row.last]
        per_row: list[Tensor | None] = [None] * len(batch)
        if flat:
            logits = self.model.logits(torch.cat(hidden))
            for k, i in enumerate(flat):
                per_row[i] = logits[k]
        return self._sample(batch, per_row)

    def run(self, plan: list[list[StepRow]]) -> list[Tensor]:
        """This rank's part of a step; on rank 0 the hidden states of the rows to sample, one
        tensor per micro-batch."""
        p, group = self.placement, self.group
        last = p.pp - 1
        dim = self.model.cfg.dim
        waits, out = [], []
        for mb in plan:
            inputs = self.inputs(mb)
            x = None
            if p.stage > 0:
                x = group.recv(torch.empty(len(inputs.ids), dim), p.rank_of(p.stage - 1, p.tp_rank))
                x = x.to(self.act_dtype)
            h = self.hidden(inputs, x)
            if p.stage < last:  # on to the next stage while this one starts the next micro-batch
                waits.append(group.send(h.float().contiguous(), p.rank_of(p.stage + 1, p.tp_rank)))
                continue
            rows = h[inputs.sample_rows].float().contiguous()
            if p.rank == 0:
                out.append(rows)
            elif p.tp_rank == 0 and len(rows):
                waits.append(group.send(rows, 0))
        for wait in waits:
            wait()
        if p.rank == 0 and last > 0:
            src = p.rank_of(last, 0)
            for mb in plan:
                n = sum(r.last for r in mb)
                out.append(group.recv(torch.empty(n, dim), src) if n else torch.empty(0, dim))
        return out

    @torch.inference_mode()
    def serve(self) -> None:
        """A worker's loop: run each step rank 0 broadcasts until it says stop."""
        while True:
            kind, plan = self.group.broadcast_obj()
            if kind == "stop":
                return
            self.run(plan)
