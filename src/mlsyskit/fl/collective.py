"""The torch.distributed transport of the FL round loop: clients are ranks, the server rank 0.

For clusters (torchrun, SLURM) where every process is trusted and up: no deadlines, no TLS.
Rank 0 runs the round loop of `mlsyskit.fl.simulation` with `CollectiveTransport`; every other
rank runs `serve_rank`. Each round rank 0 broadcasts a header (round, how to aggregate, the
active clients) and the global model; the active clients are dealt round-robin to ranks
1..W-1 (one client per rank when --clients is W-1), which train them with the simulation's
client code. Then, one collective:

- ``all-reduce`` (the default for the mean-based strategies: fedavg, fedprox and the server
  optimizers fedavgm, fedadam, fedyogi, fedadagrad, which only need the weighted mean): each
  rank checks its own clients' updates (a non-finite one contributes weight 0 and is reported
  rejected), adds n_k * (w_k - w) of the others (clipped as the flags say: `simulation.contribution`)
  and n_k into one float32 vector, with per-client slots for status, loss and update norm, and
  one ``all_reduce(SUM)`` gives rank 0 the weighted sum: rank 0 then adds DP noise, takes the
  strategy's server step and runs the commit check as the simulation does.
- ``gather`` (for the rules that need every update: median, trimmed-mean, krum, multi-krum; or
  asked for with --aggregation gather): each rank sends (client id, loss, model) rows with one
  ``gather`` to rank 0 (padded to the same number of rows per rank), and rank 0 rejects and
  aggregates them as the simulation does.

So strategies, attacks, DP and --resume work as in the simulation. Every rank loads the run's
data set (the same partitioner), as the simulation does. The config goes from rank 0 to the
others as JSON bytes; nothing is pickled. Bytes are the payloads handed to the collectives:
up, what the client ranks hand to the gather or all_reduce; down, what rank 0 broadcasts,
times the client ranks. metrics.jsonl records ``aggregation`` per round.
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
from mlsyskit.fl.config import FLConfig, aggregation_mode
from mlsyskit.fl.simulation import (
    Collected,
    Federation,
    contribution,
    contribution_weight,
    poison_update,
    setup,
    train_clients,
)
from mlsyskit.runtime import released_by_collectives

STOP = -1  # a header round of STOP ends the client ranks
MODES = ("all-reduce", "gather")  # as coded in the header
# per-client status slot of the all_reduce vector (0: no rank trained it)
ACCEPTED, NONFINITE = 1, 2


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


def _reduce_len(p: int, k: int) -> int:
    """The all_reduce vector: the weighted update sum (P), the weight sum, then per active
    client a status, a loss and an update norm."""
    return p + 1 + 3 * k


class CollectiveTransport:
    """Rank 0's side: broadcast the model, then all_reduce or gather (see the module docstring)."""

    def __init__(self, aggregation: str = "auto") -> None:
        self.asked = aggregation
        self.mode = ""
        self.world = 0
        self.header_len = 0

    def start(self, fed: Federation) -> None:
        if fed.cfg.secagg or fed.cfg.compress:
            raise UserError("--secagg and --compress need the gRPC transport (fl server / fl launch); the collective transport sends float32 models")
        self.mode = aggregation_mode(fed.cfg.strategy, self.asked)
        self.world = dist.get_world_size()
        _send_config(fed.cfg)
        self.header_len = 3 + _per_round(fed)

    def collect(self, fed: Federation, rnd: int, global_w: torch.Tensor, sampled: np.ndarray, active: np.ndarray) -> Collected:
        t0 = time.perf_counter()
        k, p = len(active), fed.num_params
        header = torch.full((self.header_len,), -1, dtype=torch.int64)
        header[0], header[1], header[2] = rnd, k, MODES.index(self.mode)
        header[3 : 3 + k] = torch.from_numpy(active.astype(np.int64))
        dist.broadcast(header, 0)
        dist.broadcast(global_w.contiguous(), 0)
        clients = self.world - 1
        down = clients * (header.numel() * 8 + p * 4)
        if self.mode == "all-reduce":
            return self._all_reduce(fed, active, t0, down)
        rows = _rows(k, self.world)
        mine = torch.zeros(rows, p + 2)
        gathered = [torch.empty(rows, p + 2) for _ in range(self.world)]
        dist.gather(mine, gathered, dst=0)
        got = torch.cat(gathered[1:])
        got = got[got[:, 0] >= 0]
        by_id = {int(r[0]): r for r in got}
        ids = [int(c) for c in active if int(c) in by_id]
        return Collected(
            ids=ids,
            models=torch.stack([by_id[c][2:] for c in ids]) if ids else torch.zeros(0, p),
            losses=torch.stack([by_id[c][1] for c in ids]) if ids else torch.zeros(0),
            train_s=time.perf_counter() - t0,
            missing=[int(c) for c in active if int(c) not in by_id],
            aggregation="gather",
            bytes_up=clients * rows * (p + 2) * 4,
            bytes_down=down,
        )

    def _all_reduce(self, fed: Federation, active: np.ndarray, t0: float, down: int) -> Collected:
        buf = torch.zeros(_reduce_len(fed.num_params, len(active)))  # rank 0 trains no client: it adds zeros
        dist.all_reduce(buf)
        got = reduced(fed, active, buf)
        got.train_s = time.perf_counter() - t0
        got.bytes_up, got.bytes_down = (self.world - 1) * buf.numel() * 4, down
        return got

    def close(self) -> None:
        if self.world and dist.is_initialized():
            header = torch.full((self.header_len,), -1, dtype=torch.int64)
            header[0] = STOP
            dist.broadcast(header, 0)
            released_by_collectives(header)  # the process exits next


def reduced(fed: Federation, active: np.ndarray, buf: torch.Tensor) -> Collected:
    """What rank 0 reads from the all_reduced vector (the sum of every rank's `contribute`)."""
    k, p = len(active), fed.num_params
    status = buf[p + 1 : p + 1 + k].round().long()
    losses, norms = buf[p + 1 + k : p + 1 + 2 * k], buf[p + 1 + 2 * k :].double()
    ok, answered = status == ACCEPTED, status > 0
    return Collected(
        ids=[int(c) for c in active[ok.numpy()]],
        models=torch.zeros(0, p),
        losses=losses[answered],
        train_s=0.0,
        missing=[int(c) for c in active[(~answered).numpy()]],
        summed=buf[:p].double(),
        nonfinite=[int(c) for c in active[(status == NONFINITE).numpy()]],
        norms=norms[ok],
        aggregation="all-reduce",
    )


def train_dealt(fed: Federation, rnd: int, global_w: torch.Tensor, active: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Train the active clients dealt to client rank `rank` (round-robin over ranks 1..W-1), as
    the simulation does (attacks included): their ids, (n, P) models and (n,) losses."""
    ids = active[rank - 1 :: world - 1]
    if not len(ids):
        return ids, torch.zeros(0, fed.num_params), torch.zeros(0)
    models, losses = train_clients(fed, rnd, global_w, ids)
    for i, c in enumerate(ids):
        if c in fed.malicious:
            models[i] = poison_update(fed, rnd, int(c), models[i], global_w)
    return ids, models, losses


def contribute(fed: Federation, active: np.ndarray, ids: np.ndarray, models: torch.Tensor, losses: torch.Tensor, global_w: torch.Tensor) -> torch.Tensor:
    """This rank's all_reduce vector: its clients' weighted updates summed, their weights, and
    in each one's slot its status, loss and update norm. A client whose update is not a finite
    vector of the model's size is checked here, not by rank 0: weight 0, status NONFINITE."""
    k, p = len(active), fed.num_params
    total = torch.zeros(p, dtype=torch.float64)
    buf = torch.zeros(_reduce_len(p, k))
    slot = {int(c): i for i, c in enumerate(active)}
    for model, loss, c in zip(models, losses, ids, strict=True):
        i = slot[int(c)]
        buf[p + 1 + k + i] = loss
        if model.shape != (p,) or not bool(torch.isfinite(model).all()):
            buf[p + 1 + i] = NONFINITE
            continue
        value, norm = contribution(fed, int(c), model, global_w)
        total += value
        buf[p] += contribution_weight(fed, int(c))
        buf[p + 1 + i] = ACCEPTED
        buf[p + 1 + 2 * k + i] = norm
    buf[:p] = total.float()
    return buf


def serve_rank(rank: int, world: int) -> dict[str, int]:
    """A client rank: train the clients dealt to it each round until rank 0 says stop."""
    cfg = _send_config(None).resolved()
    fed = setup(cfg)
    p, header_len, trained = fed.num_params, 3 + _per_round(fed), 0
    while True:
        header = torch.empty(header_len, dtype=torch.int64)
        dist.broadcast(header, 0)
        rnd, k = int(header[0]), int(header[1])
        if rnd == STOP:
            released_by_collectives(header)  # the process exits next
            return {"rank": rank, "clients_trained": trained}
        mode = MODES[int(header[2])]
        global_w = torch.empty(p)
        dist.broadcast(global_w, 0)
        active = header[3 : 3 + k].numpy()
        ids, models, losses = train_dealt(fed, rnd, global_w, active, rank, world)
        trained += len(ids)
        if mode == "all-reduce":
            dist.all_reduce(contribute(fed, active, ids, models, losses, global_w))
            continue
        out = torch.full((_rows(k, world), p + 2), -1.0)
        out[: len(ids), 0] = torch.from_numpy(ids.astype(np.float32))
        out[: len(ids), 1] = losses
        out[: len(ids), 2:] = models
        dist.gather(out, None, dst=0)
