"""The process group of a run: one process, or one rank of a torchrun launch.

torchrun (``--nproc-per-node``, ``--nnodes``, ``--rdzv-endpoint``) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is a single process and no
process group is created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mlsyskit.errors import UserError

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process
    device: torch.device = torch.device("cpu")
    bn_group: Any = None  # a second group for SyncBatchNorm's collectives, apart from DDP's

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of each value over the ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def root_then_share(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result; a UserError raised there
        is raised on every rank (so no rank waits for ever on a failed one)."""
        result: list[Any] = [None, None]
        if self.is_root:
            try:
                result = [fn(), None]
            except UserError as e:
                result = [None, str(e)]
        if self.distributed:
            dist.broadcast_object_list(result, src=0)
        if result[1] is not None:
            raise UserError(result[1])
        return result[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"${name}={os.environ[name]!r} is not an integer (set by torchrun)") from None


def setup(backend: str, device: str) -> DistContext:
    """Join torchrun's process group (when launched by it) and pick the device.

    backend "auto": nccl when the device is a GPU, else gloo. device "auto": cuda:LOCAL_RANK
    when torch sees a GPU, else the CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UserError("--device cuda: torch sees no CUDA GPU; use --device cpu (or auto)")
    use_cuda = device == "cuda" or (device == "auto" and cuda)
    dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(device=dev)
    chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and not use_cuda:
        raise UserError("--backend nccl needs CUDA GPUs; on CPUs use --backend gloo (or auto)")
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    try:
        dist.init_process_group(chosen, timeout=timedelta(minutes=10), device_id=dev if use_cuda else None)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot join the {chosen} process group as rank {rank}/{world}: {e}") from None
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=chosen, device=dev)
    ctx.bn_group = dist.new_group(backend=chosen)
    return ctx
