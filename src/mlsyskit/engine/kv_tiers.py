"""KV blocks below the pool: a host-memory tier (``kv_offload="cpu"``) and, under it, a disk
tier of memory-mapped files (``kv_offload="disk"``).

Two kinds of blocks move down:

- **prefix blocks**: a full block the pool evicts (its slot is about to hold other tokens) is
  copied to the host tier, and with a disk tier also written to a file by a worker thread. A
  later request with the same prefix (the next turn of a conversation, a shared system prompt)
  loads it back into a pool block instead of recomputing it. Blocks are keyed by a SHA-256 chain
  over the model's identity and the token ids (collision-resistant, equal across restarts), and
  a block's tokens are stored with it and compared on load;
- **swapped blocks**: a preempted sequence's blocks (``preemption="swap"``), pinned in the host
  tier until the sequence resumes.

A disk file holds a header (model identity, block size, dtype, shape, the tokens, a CRC-32 of
the payload) and the payload; it is read through a memory map. A file whose header does not
match this engine (another model, block size or dtype), or whose checksum or tokens do not
match, is ignored and logged, never loaded. The disk tier survives a restart: a new engine on
the same directory indexes the files it finds.

Only what must move moves: a block already held by a tier is not copied again, the tail of a
running sequence never leaves the pool, and loads happen only for blocks a request asks for.

Loads overlap the forward pass (``prefetch=True``): the scheduler only stages a load (a host
slot, held until the copy is done; a disk hit is first read, verified and put in a host slot),
and when the step starts a worker thread copies the staged blocks into the pool layer by layer
while the engine's thread computes; before layer ``l`` runs, the engine waits until layer ``l``
is in (:meth:`KVTiers.wait_layer`). ``copy_wait_s`` is the time the engine's thread spent
copying or waiting on a copy (``load_wait_s`` of it for blocks coming in: disk reads, copies
into the pool), ``copy_s`` the time the copies into the pool took wherever they ran. With
``prefetch=False`` every staged block is copied on the engine's thread before the step. A pool
block with a staged load is never read or reused before its copy is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mlsyskit.errors import UserError

log = logging.getLogger(__name__)

OFFLOAD = ("cpu", "disk")
PREEMPTION = ("auto", "swap", "recompute")
MAGIC = b"MLSKVB01"
SUFFIX = ".kvb"
_ALIGN = 64


def check_options(kv_offload: str | None, kv_offload_gib: float, kv_disk_gib: float, kv_offload_dir: str | Path | None,
                  preemption: str, kv_cache: bool) -> None:
    """One-line UserErrors for bad tier flags."""
    if kv_offload not in (None, *OFFLOAD):
        raise UserError(f"unknown kv_offload {kv_offload!r}; use cpu or disk (or leave it out)")
    if preemption not in PREEMPTION:
        raise UserError(f"unknown preemption {preemption!r}; use one of {', '.join(PREEMPTION)}")
    if not kv_offload_gib > 0:
        raise UserError(f"kv_offload_gib must be positive, got {kv_offload_gib}")
    if not kv_disk_gib > 0:
        raise UserError(f"kv_disk_gib must be positive, got {kv_disk_gib}")
    if kv_offload is not None and not kv_cache:
        raise UserError("kv_offload needs the KV cache (kv_cache=True)")
    if preemption == "swap" and kv_offload is None:
        raise UserError("preemption='swap' needs a tier to swap to: give kv_offload='cpu' or 'disk'")
    if kv_offload == "disk" and kv_offload_dir is None:
        raise UserError("kv_offload='disk' needs kv_offload_dir (the directory of the block files)")
    if kv_offload_dir is not None and kv_offload != "disk":
        raise UserError("kv_offload_dir is only used with kv_offload='disk'")


def model_identity(source: str, config: dict[str, Any], extra: dict[str, Any]) -> str:
    """SHA-256 (hex) naming what a KV block depends on: the architecture, the engine's dtypes
    and block size, and the weights (each weight file's size, first and last MiB)."""
    h = hashlib.sha256(json.dumps({"config": config, **extra}, sort_keys=True, default=str).encode())
    p = Path(source)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.suffix in (".gguf", ".safetensors", ".bin", ".pt")) if p.is_dir() else []
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def root_key(identity: str) -> bytes:
    return hashlib.sha256(b"mlsyskit-kv\0" + identity.encode()).digest()


def chain_key(prev: bytes, tokens: tuple[int, ...]) -> bytes:
    """The key of a full block: SHA-256 of the previous block's key and this block's tokens."""
    return hashlib.sha256(prev + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


class HostTier:
    """Preallocated host slots of whole blocks; cached prefix blocks in LRU order, swapped
    blocks pinned (not evictable) until they go back."""

    def __init__(self, n_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.data = torch.empty((n_slots, *block_shape), dtype=dtype)
        self.free: list[int] = list(range(n_slots - 1, -1, -1))
        self.cached: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()
        self.pinned = 0

    @property
    def n_slots(self) -> int:
        return self.data.shape[0]

    def room(self) -> int:
        """Slots that can be had now (free ones plus evictable cached ones)."""
        return len(self.free) + len(self.cached)

    def take(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.cached:  # the least recently used prefix block makes room
            _, (slot, _) = self.cached.popitem(last=False)
            return slot
        return None


class DiskTier:
    """One file per block under ``directory``; written by a worker thread, read through mmap."""

    def __init__(self, directory: str | Path, capacity_bytes: float, identity: str, block_size: int,
                 dtype: torch.dtype, block_shape: tuple[int, ...]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot use kv_offload_dir {self.dir}: {e.strerror or e}") from None
        self.want = {"model": identity, "block_size": block_size, "dtype": str(dtype).removeprefix("torch."),
                     "shape": list(block_shape)}
        self.dtype = dtype
        self.shape = block_shape
        self.payload_bytes = int(np.prod(block_shape)) * torch.empty(0, dtype=dtype).element_size()
        self.capacity_files = max(1, int(capacity_bytes // (self.payload_bytes + 4096)))
        self.index: OrderedDict[bytes, None] = OrderedDict()  # keys on disk, least recently used first
        self.pending: dict[bytes, tuple[tuple[int, ...], Tensor]] = {}
        self.lock = threading.Lock()
        self.rejected = 0  # files ignored: foreign, stale, corrupt
        self.bytes_written = 0
        self._scan()
        self.q: queue.Queue[bytes | None] = queue.Queue()
        self.worker = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self.worker.start()

    # -- files ----------------------------------------------------------------------------
    def _path(self, key: bytes) -> Path:
        return self.dir / f"{key.hex()}{SUFFIX}"

    def _header(self, path: Path) -> tuple[dict[str, Any], int] | None:
        """The header and the payload offset, or None (logged) when the file is not ours."""
        try:
            with open(path, "rb") as f:
                head = f.read(12)
                if len(head) < 12 or head[:8] != MAGIC:
                    raise ValueError("not a KV block file")
                n = struct.unpack("<I", head[8:])[0]
                meta = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            self._reject(path, f"unreadable header ({e})")
            return None
        bad = [k for k, v in self.want.items() if meta.get(k) != v]
        if bad:
            self._reject(path, "written for another " + "/".join("model identity" if k == "model" else k.replace("_", " ") for k in bad))
            return None
        return meta, -(-(12 + n) // _ALIGN) * _ALIGN

    def _reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        log.warning("KV disk tier: ignoring %s: %s", path, why)

    def _scan(self) -> None:
        files = []
        for f in self.dir.glob(f"*{SUFFIX}"):
            try:
                key = bytes.fromhex(f.name.removesuffix(SUFFIX))
            except ValueError:
                continue
            if len(key) == 32 and self._header(f) is not None:
                files.append((f.stat().st_mtime, key))
        for _, key in sorted(files):
            self.index[key] = None

    def __contains__(self, key: bytes) -> bool:
        with self.lock:
            return key in self.index or key in self.pending

    def __len__(self) -> int:
        return len(self.index)

    def put(self, key: bytes, tokens: tuple[int, ...], block: Tensor) -> None:
        """Queue ``block`` (a copy the caller no longer touches) to be written."""
        with self.lock:
            if key in self.index or key in self.pending:
                return
            self.pending[key] = (tokens, block)
        self.q.put(key)

    def _write_loop(self) -> None:
        while (key := self.q.get()) is not None:
            try:
                with self.lock:
                    tokens, block = self.pending[key]
                self._write(key, tokens, block)
            except OSError as e:
                log.warning("KV disk tier: cannot write a block: %s", e)
            finally:
                with self.lock:
                    self.pending.pop(key, None)
                self.q.task_done()
        self.q.task_done()

    def _write(self, key: bytes, tokens: tuple[int, ...], block: Tensor) -> None:
        payload = block.contiguous().view(torch.uint8).numpy().tobytes()
        meta = json.dumps({**self.want, "key": key.hex(), "tokens": list(tokens), "crc32": zlib.crc32(payload)}).encode()
        start = -(-(12 + len(meta)) // _ALIGN) * _ALIGN
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(meta)) + meta)
            f.write(b"\0" * (start - 12 - len(meta)))
            f.write(payload)
        os.replace(tmp, path)  # readers never see half a file
        self.bytes_written += len(payload)
        with self.lock:
            self.index[key] = None
            while len(self.index) > self.capacity_files:
                old, _ = self.index.popitem(last=False)
                self._path(old).unlink(missing_ok=True)

    def load(self, key: bytes, tokens: tuple[int, ...]) -> Tensor | None:
        """The block's data, or None when it is missing, foreign, corrupt or for other tokens."""
        with self.lock:
            if key in self.pending:
                t, block = self.pending[key]
                return block if t == tokens else None
            if key not in self.index:
                return None
            self.index.move_to_end(key)
        path = self._path(key)
        got = self._header(path)
        if got is None:
            self._forget(key)
            return None
        meta, start = got
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(self.payload_bytes,))
        except (OSError, ValueError) as e:
            self._reject(path, f"payload unreadable ({e})")
            self._forget(key)
            return None
        if zlib.crc32(mm) != meta.get("crc32"):
            self._reject(path, "checksum mismatch (corrupt)")
            self._forget(key)
            return None
        if tuple(meta.get("tokens", ())) != tokens or meta.get("key") != key.hex():
            self._reject(path, "tokens differ from the request's")
            return None
        return torch.from_numpy(np.array(mm)).view(self.dtype).view(self.shape)

    def _forget(self, key: bytes) -> None:
        with self.lock:
            self.index.pop(key, None)

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self.q.join()

    def close(self) -> None:
        self.flush()
        self.q.put(None)
        self.worker.join(timeout=10)


class KVTiers:
    """The tiers under one :class:`~mlsyskit.engine.attention.PagedKVCache`'s pools."""

    def __init__(self, k_pool: Tensor, v_pool: Tensor, *, host_bytes: float, identity: str, block_size: int,
                 disk_dir: str | Path | None = None, disk_bytes: float = 0.0, prefix: bool = True,
                 prefetch: bool = True) -> None:
        self.k, self.v = k_pool, v_pool  # (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        n_layers, _, bs, hkv, d = k_pool.shape
        self.block_shape = (2, n_layers, bs, hkv, d)
        self.block_bytes = 2 * k_pool[:, 0].nbytes
        self.host = HostTier(max(1, int(host_bytes // self.block_bytes)), self.block_shape, k_pool.dtype)
        self.disk = None if disk_dir is None else DiskTier(disk_dir, disk_bytes, identity, block_size, k_pool.dtype, self.block_shape)
        self.root = root_key(identity)
        self.prefix = prefix  # keep evicted prefix blocks (False: the tier only holds swapped blocks)
        self.prefetch = prefetch
        self.stats = dict.fromkeys(
            ("bytes_pool_to_cpu", "bytes_cpu_to_pool", "bytes_disk_to_pool", "cpu_hits", "cpu_lookups",
             "disk_hits", "disk_lookups", "swap_outs", "swap_ins", "blocks_swapped_out", "blocks_swapped_in",
             "loads_overlapped", "loads_sync"), 0)
        self.copy_wait_s = 0.0  # the engine's thread copying or waiting on a copy
        self.copy_s = 0.0  # copies into the pool, wherever they ran
        self.load_wait_s = 0.0  # of copy_wait_s: bringing blocks in (disk reads, copies into the pool)
        # staged loads: pool block -> (host slot, key and tokens of a cached block | None for a swapped one)
        self.staged: dict[int, tuple[int, tuple[bytes, tuple[int, ...]] | None]] = {}
        self._job: _LayerCopy | None = None
        self._jobs: queue.Queue[_LayerCopy | None] | None = None

    # -- pool <-> tier copies --------------------------------------------------------------
    def _block(self, bid: int) -> Tensor:
        return torch.stack((self.k[:, bid], self.v[:, bid]))

    def _to_pool(self, bid: int, data: Tensor) -> None:
        self.k[:, bid].copy_(data[0])
        self.v[:, bid].copy_(data[1])

    def has(self, key: bytes) -> bool:
        return key in self.host.cached or (self.disk is not None and key in self.disk)

    def save(self, bid: int, key: bytes, tokens: tuple[int, ...]) -> None:
        """Pool block ``bid`` is about to be reused: keep its contents in the tier(s)."""
        if not self.prefix:
            return
        self.settle([bid])
        t0 = time.perf_counter()
        if key in self.host.cached:
            self.host.cached.move_to_end(key)
        else:
            slot = self.host.take()
            if slot is not None:
                self.host.data[slot, 0].copy_(self.k[:, bid])
                self.host.data[slot, 1].copy_(self.v[:, bid])
                self.host.cached[key] = (slot, tokens)
                self.stats["bytes_pool_to_cpu"] += self.block_bytes
        if self.disk is not None and key not in self.disk:  # write-through: survives a restart
            self.disk.put(key, tokens, self._block(bid))
        self.copy_wait_s += time.perf_counter() - t0

    def persist(self, bid: int, key: bytes, tokens: tuple[int, ...]) -> None:
        """Queue pool block ``bid`` for the disk tier unless it is there already."""
        if self.disk is not None and self.prefix and key not in self.disk:
            self.settle([bid])
            self.disk.put(key, tokens, self._block(bid))

    def load(self, bid: int, key: bytes, tokens: tuple[int, ...]) -> str | None:
        """Stage the block keyed ``key`` for pool block ``bid`` (copied when the next step runs,
        see :meth:`start`); the tier it came from, or None."""
        self.stats["cpu_lookups"] += 1
        hit = self.host.cached.get(key)
        if hit is not None and hit[1] == tokens:
            del self.host.cached[key]  # held (not evictable) until the copy is done
            self.staged[bid] = (hit[0], (key, tokens))
            self.stats["cpu_hits"] += 1
            self.stats["bytes_cpu_to_pool"] += self.block_bytes
            return "cpu"
        if self.disk is None:
            return None
        self.stats["disk_lookups"] += 1
        t0 = time.perf_counter()
        try:
            data = self.disk.load(key, tokens)  # read and verified now: a bad file is a miss
            if data is None:
                return None
            self.stats["disk_hits"] += 1
            self.stats["bytes_disk_to_pool"] += self.block_bytes
            slot = self.host.take()
            if slot is None:  # every host slot holds a swapped block: straight into the pool
                self.settle([bid])
                self._to_pool(bid, data)
                return "disk"
            self.host.data[slot].copy_(data)  # promoted to the host tier, then staged from there
            self.staged[bid] = (slot, (key, tokens))
            return "disk"
        finally:
            dt = time.perf_counter() - t0
            self.copy_wait_s += dt
            self.load_wait_s += dt

    # -- staged loads: copied layer by layer, overlapping the forward pass ---------------------
    def start(self) -> None:
        """Copy the staged loads into the pool: on the worker thread, layer by layer (the engine
        calls :meth:`wait_layer` before each layer), or with ``prefetch=False`` all of them now."""
        if not self.staged or self._job is not None:
            return
        job = _LayerCopy(self, dict(self.staged))
        self.staged.clear()
        if not self.prefetch:
            t0 = time.perf_counter()
            job.run()
            self._waited(time.perf_counter() - t0)
            self._finish(job)
            return
        if self._jobs is None:
            self._jobs = queue.Queue()
            threading.Thread(target=self._copy_loop, name="kv-prefetch", daemon=True).start()
        self._job = job
        self._jobs.put(job)

    def _copy_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def wait_layer(self, layer: int) -> None:
        """Block until layer ``layer`` of the loads in flight is in the pool."""
        job = self._job
        if job is not None and job.done_layers <= layer:
            t0 = time.perf_counter()
            job.wait(layer + 1)
            self._waited(time.perf_counter() - t0)

    def _waited(self, seconds: float) -> None:
        self.copy_wait_s += seconds
        self.load_wait_s += seconds

    def complete(self) -> None:
        """Every staged or in-flight load is in the pool (its host slots go back)."""
        if self._job is not None:
            job, self._job = self._job, None
            t0 = time.perf_counter()
            job.wait(job.n_layers)
            self._waited(time.perf_counter() - t0)
            self._finish(job)
        if self.staged:
            prefetch, self.prefetch = self.prefetch, False
            try:
                self.start()
            finally:
                self.prefetch = prefetch

    def settle(self, bids: list[int]) -> None:
        """Complete the loads first if any of pool blocks ``bids`` has one pending (the block
        is about to be read, or reused for other tokens)."""
        job = self._job
        if (self.staged or job is not None) and any(b in self.staged or (job is not None and b in job.items) for b in bids):
            self.complete()

    def pending(self, tables: Tensor | None) -> bool:
        """Whether a load is staged or in flight into a block of ``tables`` (block ids; None:
        unknown, so any load counts)."""
        bids = list(self.staged) + (list(self._job.items) if self._job is not None else [])
        if not bids:
            return False
        return tables is None or bool(torch.isin(tables.long(), torch.tensor(bids)).any())

    def _finish(self, job: _LayerCopy) -> None:
        if job.error is not None:
            raise job.error
        self.copy_s += job.seconds
        self.stats["loads_overlapped" if self.prefetch else "loads_sync"] += len(job.items)
        for slot, cached in job.items.values():
            if cached is None:  # a swapped block is back: its slot is free
                self.release([slot])
            elif cached[0] in self.host.cached:  # saved again meanwhile: keep one copy
                self.host.free.append(slot)
            else:
                self.host.cached[cached[0]] = (slot, cached[1])

    # -- swap -------------------------------------------------------------------------------
    def swap_out(self, bids: list[int]) -> list[int] | None:
        """Copy pool blocks ``bids`` to pinned host slots; None when the tier has no room."""
        if self.host.room() < len(bids):
            return None
        self.settle(bids)
        t0 = time.perf_counter()
        slots = [self.host.take() for _ in bids]
        idx, src = torch.tensor(slots), torch.tensor(bids)
        self.host.data[idx, 0] = self.k.index_select(1, src).transpose(0, 1)
        self.host.data[idx, 1] = self.v.index_select(1, src).transpose(0, 1)
        self.host.pinned += len(slots)
        self.stats["swap_outs"] += 1
        self.stats["blocks_swapped_out"] += len(slots)
        self.stats["bytes_pool_to_cpu"] += len(slots) * self.block_bytes
        self.copy_wait_s += time.perf_counter() - t0
        return slots  # type: ignore[return-value]

    def swap_in(self, slots: list[int], bids: list[int]) -> None:
        """Stage swapped blocks to go back into pool blocks ``bids``; their slots are freed once
        the copy is done."""
        for slot, bid in zip(slots, bids, strict=True):
            self.staged[bid] = (slot, None)
        self.stats["swap_ins"] += 1
        self.stats["blocks_swapped_in"] += len(slots)
        self.stats["bytes_cpu_to_pool"] += len(slots) * self.block_bytes

    def release(self, slots: list[int]) -> None:
        """Give swapped slots back (the sequence resumed, finished or was aborted)."""
        self.host.free.extend(slots)
        self.host.pinned -= len(slots)

    # -- accounting -------------------------------------------------------------------------
    def usage(self) -> dict[str, float]:
        s = self.stats
        out: dict[str, float] = {
            "cpu_blocks_cached": len(self.host.cached),
            "cpu_blocks_swapped": self.host.pinned,
            "cpu_blocks_total": self.host.n_slots,
            "cpu_hit_rate": s["cpu_hits"] / s["cpu_lookups"] if s["cpu_lookups"] else 0.0,
            "copy_wait_s": self.copy_wait_s,
            "copy_s": self.copy_s,
            "load_wait_s": self.load_wait_s,
            **{k: float(v) for k, v in s.items()},
        }
        if self.disk is not None:
            out.update({
                "disk_blocks": len(self.disk),
                "disk_blocks_total": self.disk.capacity_files,
                "disk_hit_rate": s["disk_hits"] / s["disk_lookups"] if s["disk_lookups"] else 0.0,
                "bytes_to_disk": float(self.disk.bytes_written),
                "disk_files_rejected": self.disk.rejected,
            })
        return out

    def flush(self) -> None:
        self.complete()
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        self.complete()
        if self._jobs is not None:
            self._jobs.put(None)
        if self.disk is not None:
            self.disk.close()


class _LayerCopy:
    """One step's staged loads, copied into the pool one layer at a time (all blocks of layer
    ``l`` before any of layer ``l + 1``); ``done_layers`` says how far it got."""

    def __init__(self, tiers: KVTiers, items: dict[int, tuple[int, tuple[bytes, tuple[int, ...]] | None]]) -> None:
        self.tiers, self.items = tiers, items
        self.n_layers = tiers.k.shape[0]
        self.done_layers = 0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def run(self) -> None:
        t0 = time.perf_counter()
        t = self.tiers
        try:
            dst = torch.tensor(list(self.items), dtype=torch.long)
            src = torch.tensor([slot for slot, _ in self.items.values()], dtype=torch.long)
            with torch.inference_mode():
                for layer in range(self.n_layers):
                    t.k[layer].index_copy_(0, dst, t.host.data[:, 0, layer].index_select(0, src))
                    t.v[layer].index_copy_(0, dst, t.host.data[:, 1, layer].index_select(0, src))
                    with self.cond:
                        self.done_layers = layer + 1
                        self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the engine's thread
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0
            with self.cond:
                self.done_layers = self.n_layers
                self.cond.notify_all()

    def wait(self, layers: int) -> None:
        with self.cond:
            while self.done_layers < layers:
                self.cond.wait()
        if self.error is not None:
            raise self.error
