"""The torch.distributed transport of the FL round loop: clients are ranks, the server rank 0.

For clusters (torchrun, SLURM) where every process is trusted and up: no deadlines, no TLS.
Rank 0 runs the round loop of `mlsyskit.fl.simulation` with `CollectiveTransport`; every other
rank runs `serve_rank`. Each round rank 0 broadcasts a header (round, the active clients) and
the global model; the active clients are dealt round-robin to ranks 1..W-1 (one client per
rank when --clients is W-1), which train them with the simulation's client code and send
(client id, loss, model) rows back with one `gather` to rank 0 (padded to the same number of
rows per rank). Rank 0 then rejects, aggregates, evaluates and checkpoints as always, so
strategies, attacks and --resume work as in the simulation. Every rank loads the run's data
set (the same partitioner), as the simulation does. The config goes from rank 0 to the
others as JSON bytes; nothing is pickled. Bytes are the payloads handed to the collectives.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from mlsyskit.errors import UserError
from mlsyskit.fl.config import FLConfig
from mlsyskit.fl.simulation import Collected, Federation, poison_update, setup, train_clients

STOP = -1  # a header round of STOP ends the client ranks


def init(timeout_s: float, backend: str = "gloo") -> tuple[int, int]:
    """Join the process group named by torchrun's environment (RANK, WORLD_SIZE, MASTER_*)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"fl collective runs under torchrun (or fl launch --transport torchdist); {', '.join(missing)} not set")
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        raise UserError("fl collective needs at least 2 ranks: the server (rank 0) and a client rank")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), world


def _send_config(cfg: FLConfig | None) -> FLConfig:
    """Rank 0's config, as JSON bytes, on every rank."""
    data = json.dumps(cfg.to_json()).encode() if cfg is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, 0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    if cfg is not None:
        return cfg
    names = set(FLConfig.__dataclass_fields__)
    return FLConfig(**{k: v for k, v in json.loads(bytes(buf.tolist())).items() if k in names})


def _per_round(fed: Federation) -> int:
    return fed.strategy.clients_per_round(len(fed.parts), fed.cfg.fraction)


def _rows(k: int, world: int) -> int:
    return math.ceil(k / (world - 1))


class CollectiveTransport:
    """Rank 0's side: broadcast the model, gather the client ranks' models (see the module docstring)."""

    def __init__(self) -> None:
        self.world = 0
        self.header_len = 0

    def start(self, fed: Federation) -> None:
        if fed.cfg.secagg or fed.cfg.compress:
            raise UserError("--secagg and --compress need the gRPC transport (fl server / fl launch); the collective transport sends float32 models")
        self.world = dist.get_world_size()
        _send_config(fed.cfg)
        self.header_len = 2 + _per_round(fed)

    def collect(self, fed: Federation, rnd: int, global_w: torch.Tensor, sampled: np.ndarray, active: np.ndarray) -> Collected:
        t0 = time.perf_counter()
        k, p = len(active), fed.num_params
        header = torch.full((self.header_len,), -1, dtype=torch.int64)
        header[0], header[1] = rnd, k
        header[2 : 2 + k] = torch.from_numpy(active.astype(np.int64))
        dist.broadcast(header, 0)
        dist.broadcast(global_w.contiguous(), 0)
        rows = _rows(k, self.world)
        mine = torch.zeros(rows, p + 2)
        gathered = [torch.empty(rows, p + 2) for _ in range(self.world)]
        dist.gather(mine, gathered, dst=0)
        got = torch.cat(gathered[1:])
        got = got[got[:, 0] >= 0]
        by_id = {int(r[0]): r for r in got}
        ids = [int(c) for c in active if int(c) in by_id]
        clients = self.world - 1
        return Collected(
            ids=ids,
            models=torch.stack([by_id[c][2:] for c in ids]) if ids else torch.zeros(0, p),
            losses=torch.stack([by_id[c][1] for c in ids]) if ids else torch.zeros(0),
            train_s=time.perf_counter() - t0,
            missing=[int(c) for c in active if int(c) not in by_id],
            bytes_up=clients * rows * (p + 2) * 4,
            bytes_down=clients * (header.numel() * 8 + p * 4),
        )

    def close(self) -> None:
        if self.world and dist.is_initialized():
            header = torch.full((self.header_len,), -1, dtype=torch.int64)
            header[0] = STOP
            dist.broadcast(header, 0)


def serve_rank(rank: int, world: int) -> dict[str, int]:
    """A client rank: train the clients dealt to it each round until rank 0 says stop."""
    cfg = _send_config(None).resolved()
    fed = setup(cfg)
    p, header_len, trained = fed.num_params, 2 + _per_round(fed), 0
    while True:
        header = torch.empty(header_len, dtype=torch.int64)
        dist.broadcast(header, 0)
        rnd, k = int(header[0]), int(header[1])
        if rnd == STOP:
            return {"rank": rank, "clients_trained": trained}
        global_w = torch.empty(p)
        dist.broadcast(global_w, 0)
        active = header[2 : 2 + k].numpy()
        ids = active[rank - 1 :: world - 1]
        out = torch.full((_rows(k, world), p + 2), -1.0)
        if len(ids):
            models, losses = train_clients(fed, rnd, global_w, ids)
            for i, c in enumerate(ids):
                if c in fed.malicious:
                    models[i] = poison_update(fed, rnd, int(c), models[i], global_w)
            out[: len(ids), 0] = torch.from_numpy(ids.astype(np.float32))
            out[: len(ids), 1] = losses
            out[: len(ids), 2:] = models
            trained += len(ids)
        dist.gather(out, None, dst=0)
