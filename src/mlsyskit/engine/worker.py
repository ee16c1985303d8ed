"""Starting the ranks of a parallel engine: spawned by ``LLM(...)`` itself, or under ``torchrun``.

Spawned (the default): rank 0 is the calling process. It opens a TCP store on 127.0.0.1 (a
free port picked by the OS) and starts ``tp * pp - 1`` worker processes (torch.multiprocessing,
``spawn``, daemonic). Each worker connects, loads the checkpoint itself (a path is sent, not the
weights; an in-memory :class:`Checkpoint` is pickled), builds its shard with the same engine
settings as rank 0, says it is ready, and serves steps until rank 0 says stop or goes away (its
sockets close: the worker's wait fails and it exits). A worker that fails while starting leaves
its error in the store; rank 0 raises it.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set, and
``WORLD_SIZE == tp * pp``) every process runs the user's script: on rank 0 ``LLM(...)``
returns and drives; on the others it serves rank 0's steps and then ends the process
(``SystemExit(0)``) when rank 0 closes.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlsyskit.engine.llm_engine import LLMEngine
from mlsyskit.engine.parallel import ALLREDUCE, Group, Placement, SharedSum, WorkerError
from mlsyskit.engine.settings import EngineSettings
from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import Checkpoint
from mlsyskit.quant.model_io import load_checkpoint

STARTUP_S = 300.0  # a worker's load and shard, on a busy machine


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun, else None."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not all(k in os.environ for k in keys):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def launch(
    checkpoint: Checkpoint, native: bool, placement: Placement, settings: EngineSettings, *,
    pickle_checkpoint: bool, timeout: float, allreduce: str = "shm",
) -> Group:
    """Rank 0's :class:`Group` with its workers started (spawned, or already there under
    torchrun). On a torchrun rank other than 0 this serves and then exits the process."""
    env = torchrun_env()
    if env is not None:
        rank, world = env
        if world != placement.world:
            raise UserError(
                f"torchrun started {world} processes but tensor_parallel_size x pipeline_parallel_size "
                f"= {placement.world}"
            )
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent, timeout=timedelta(seconds=STARTUP_S))
        store = dist.PrefixStore("mlsyskit", store)
        group = Group(store, placement.at(rank), timeout, loopback=False)
        if rank != 0:
            _serve(group, checkpoint, settings)
            raise SystemExit(0)
        return group
    store = dist.TCPStore("127.0.0.1", 0, placement.world, is_master=True,
                          timeout=timedelta(seconds=STARTUP_S), wait_for_workers=False)
    source = None if pickle_checkpoint else checkpoint.source
    shm = SharedSum.allocate(placement) if allreduce == "shm" and placement.tp > 1 else None
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, placement.world):
        proc = ctx.Process(
            target=worker_main, daemon=True, name=f"mlsyskit-rank{rank}",
            args=(store.port, placement.at(rank), timeout, source, native,
                  checkpoint if pickle_checkpoint else None, settings, torch.get_num_threads(), shm),
        )
        proc.start()
        procs.append(proc)
    try:
        # the groups' rendezvous would wait out their timeout for a worker that never comes
        deadline = time.monotonic() + STARTUP_S
        while not store.check([f"joined{r}" for r in range(1, placement.world)]):
            dead = next((p for p in procs if p.exitcode is not None), None)
            if dead is not None or time.monotonic() > deadline:
                raise WorkerError(f"{dead.name} exited with code {dead.exitcode} (a script that starts a "
                                  "parallel LLM needs `if __name__ == '__main__':`, see its stderr)" if dead
                                  else "startup timed out")
            time.sleep(0.02)
        return Group(store, placement, timeout, procs=procs, shm=shm)
    except BaseException as e:
        _stop(procs)
        why = _worker_errors(store, procs) or (str(e).splitlines() or [type(e).__name__])[0]
        raise WorkerError(f"parallel workers did not start: {why}") from None


def wait_ready(group: Group) -> None:
    """Wait until every spawned worker has built its shard; raise its error if one failed."""
    keys = [f"ready{r}" for r in range(1, group.placement.world)]
    deadline = time.monotonic() + STARTUP_S
    while not group.store.check(keys):
        failed = any(group.store.check([f"error{r}"]) for r in range(1, group.placement.world))
        if failed or group.dead_worker() or time.monotonic() > deadline:
            why = _worker_errors(group.store, group.procs) or group.dead_worker() or "startup timed out"
            group.failure = f"parallel workers did not start: {why}"
            group.close()
            raise WorkerError(group.failure)
        time.sleep(0.02)


def _worker_errors(store: dist.Store, procs: list[Any]) -> str | None:
    for r in range(1, len(procs) + 1):
        try:
            if store.check([f"error{r}"]):
                return f"rank {r}: {store.get(f'error{r}').decode()}"
        except Exception:  # noqa: BLE001 - the store itself may be gone
            return None
    return None


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(2.0)


def _serve(group: Group, checkpoint: Checkpoint, settings: EngineSettings) -> None:
    """Build this rank's shard, say so, and serve steps until rank 0 stops."""
    try:
        engine = LLMEngine(checkpoint, settings, parallel=group)
    except BaseException as e:
        group.store.set(f"error{group.placement.rank}", (str(e).splitlines() or [type(e).__name__])[0])
        raise
    group.store.set(f"ready{group.placement.rank}", "1")
    try:
        engine.runner.serve()
    except RuntimeError:  # rank 0 went away (its sockets closed): nothing left to serve
        pass


def worker_main(
    port: int, placement: Placement, timeout: float, source: str | None, native: bool,
    checkpoint: Checkpoint | None, settings: EngineSettings, threads: int, shm: tuple[Any, Any] | None = None,
) -> None:
    """A spawned worker process."""
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, placement.world, is_master=False, timeout=timedelta(seconds=STARTUP_S))
    try:
        store.set(f"joined{placement.rank}", "1")
        group = Group(store, placement, timeout, shm=shm)
        if checkpoint is None:
            checkpoint = load_checkpoint(Path(source), dtype=torch.float32, native=native)
        _serve(group, checkpoint, settings)
    except BaseException as e:
        if not store.check([f"error{placement.rank}"]):
            store.set(f"error{placement.rank}", (str(e).splitlines() or [type(e).__name__])[0])
        print(f"mlsyskit parallel worker rank {placement.rank}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        sys.exit(1)


def start_parallel(
    checkpoint: Checkpoint, native: bool, tensor_parallel_size: int, pipeline_parallel_size: int,
    settings: EngineSettings, *, pickle_checkpoint: bool, timeout: float,
    allreduce: str = "shm",
) -> Group | None:
    """Check the split and start the ranks (None for a single process); see :func:`launch`."""
    placement = Placement(tensor_parallel_size, pipeline_parallel_size)
    placement.check(checkpoint.config, checkpoint.state_dict, settings.quantization)
    if placement.world == 1:
        return None
    if not settings.kv_cache:
        raise UserError("parallel inference needs the KV cache (leave kv_cache=True)")
    if settings.kv_offload is not None:
        raise UserError("KV offload tiers are not supported with tensor/pipeline parallel inference")
    if timeout <= 0:
        raise UserError(f"parallel_timeout must be positive, got {timeout}")
    if allreduce not in ALLREDUCE:
        raise UserError(f"unknown parallel_allreduce {allreduce!r}; use one of {', '.join(ALLREDUCE)}")
    return launch(checkpoint, native, placement, settings, pickle_checkpoint=pickle_checkpoint, timeout=timeout,
                  allreduce=allreduce)
