"""The server's round loop of McMahan et al.'s FedAvg, once, under several transports.

Each round the strategy samples clients, dropout is applied, a `Transport` sends them the
global model and brings back their updates (`InProcess`: the clients are simulated in this
process, data loaded once as tensors and clients as index arrays into them; the gRPC transport
of `mlsyskit.fl.grpc_server`: client processes; `mlsyskit.fl.collective`: torch.distributed
ranks), non-finite updates are rejected, updates are
clipped (when asked), and the strategy aggregates. A transport may instead bring back only the
weighted sum of the updates (--secagg: unmasked; the collective transport: one all_reduce, the
non-finite ones already left out by the clients' own ranks), which becomes the same weighted
mean before the strategy's server step. An aggregate that is not finite or whose step jumps by orders of magnitude
is not committed, and a run that commits nothing for STALL_ROUNDS rounds in a row stops.
Every source of randomness is derived from (seed, round, client), so a resumed run
follows exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mlsyskit.data import Dataset, load_dataset, partition, partition_stats
from mlsyskit.data.paths import resolve_data_dir
from mlsyskit.errors import UserError
from mlsyskit.fl import rundir
from mlsyskit.fl.attacks import choose_malicious, finite_rows, poison
from mlsyskit.fl.client import (
    ClientBatch,
    LocalTraining,
    batch_plan,
    evaluate,
    train_sequential,
    train_vectorized,
)
from mlsyskit.fl.config import FLConfig
from mlsyskit.fl.params import get_flat, set_flat
from mlsyskit.fl.strategies import Strategy, StrategyOptions, make_strategy
from mlsyskit.models import build_model
from mlsyskit.runtime import keep_freed_memory

# An aggregate step longer than this many times max(|global model|, smallest client update) is
# not committed: honest rounds move the model by a fraction of its norm (server momentum and
# adaptive steps by a few times a client's update), a scaled attack by orders of magnitude more.
MAX_STEP_RATIO = 100.0
# A run whose trained clients get nothing committed this many rounds in a row stops: the model
# can no longer change.
STALL_ROUNDS = 3


@dataclass
class Federation:
    """Everything the rounds share, built once: data, client split, model, strategy."""

    cfg: FLConfig
    data: Dataset
    parts: list[np.ndarray]
    counts: np.ndarray
    malicious: np.ndarray
    model: torch.nn.Module
    strategy: Strategy
    vectorized: bool

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class RoundResult:
    global_w: torch.Tensor
    sampled: list[int]
    trained: list[int]
    rejected: list[int]
    train_loss: float | None
    train_s: float
    note: str | None = None  # why nothing (or not everything) was committed, for the log
    dropped: list[int] = field(default_factory=list)  # sampled clients whose update never came
    bytes_up: int = 0
    bytes_down: int = 0
    aggregation: str | None = None


@dataclass
class Collected:
    """What a transport brought back from one round's clients."""

    ids: list[int]  # clients whose update is a (P,) model, in the order they were asked
    models: torch.Tensor  # (len(ids), P)
    losses: torch.Tensor  # (len(ids),) mean local training loss
    train_s: float
    malformed: list[int] = field(default_factory=list)  # answered with something not a model
    missing: list[int] = field(default_factory=list)  # asked, but no answer by the deadline
    # Aggregated before it got here (--secagg: unmasked; collective: one all_reduce): the sum of
    # the `ids` clients' `contribution`s, float64 (P,); `models` is then empty.
    summed: np.ndarray | torch.Tensor | None = None
    nonfinite: list[int] = field(default_factory=list)  # summed: clients whose own side found their update non-finite (weight 0)
    norms: torch.Tensor | None = None  # summed: the `ids` clients' update norms (for the step check); None under --secagg
    aggregation: str | None = None  # how the transport aggregated, for metrics.jsonl (collective: all-reduce or gather)
    bytes_up: int = 0
    bytes_down: int = 0


class Transport(Protocol):
    """How the round loop reaches its clients: send the global model, collect their models."""

    def start(self, fed: Federation) -> None: ...

    def collect(self, fed: Federation, rnd: int, global_w: torch.Tensor, sampled: np.ndarray, active: np.ndarray) -> Collected: ...

    def close(self) -> None: ...


class InProcess:
    """The simulation: every client trains in this process (bytes counted as 4 * P per model,
    or the size of the encoded update under --compress)."""

    def start(self, fed: Federation) -> None:
        pass

    def collect(self, fed: Federation, rnd: int, global_w: torch.Tensor, sampled: np.ndarray, active: np.ndarray) -> Collected:
        t0 = time.perf_counter()
        models, losses = train_clients(fed, rnd, global_w, active)
        train_s = time.perf_counter() - t0
        for i, c in enumerate(active):
            if c in fed.malicious:
                models[i] = poison_update(fed, rnd, int(c), models[i], global_w)
        size = 4 * fed.num_params
        up = len(active) * size
        if fed.cfg.compress:  # what the server rebuilds from each int8 update, and its real size
            from mlsyskit.fl import compress, wire

            up = sum(len(wire.encode_update(m, global_w, fed.cfg.compress)) for m in models)
            models = torch.stack([compress.roundtrip(m, global_w) for m in models])
        if fed.cfg.secagg:
            from mlsyskit.fl import secagg

            values = {int(c): secagg.encode(secagg_contribution(fed, int(c), models[i], global_w)) for i, c in enumerate(active)}
            try:
                total, ids = secagg.run_in_process(values, rnd, 0, secagg_threshold(fed))
            except secagg.SecAggError as e:
                raise UserError(f"round {rnd}: secure aggregation failed: {e}") from None
            return Collected(
                ids=ids, models=torch.zeros(0, fed.num_params), losses=losses, train_s=train_s, summed=total,
                bytes_up=len(active) * size, bytes_down=len(sampled) * size,
            )
        return Collected(
            ids=active.tolist(),
            models=models,
            losses=losses,
            train_s=train_s,
            bytes_up=up,
            bytes_down=len(sampled) * size,
        )

    def close(self) -> None:
        pass


def secagg_threshold(fed: Federation) -> int:
    """--secagg-threshold, by default a majority of the clients sampled a round."""
    from mlsyskit.fl import secagg

    if fed.cfg.secagg_threshold is not None:
        return fed.cfg.secagg_threshold
    return secagg.default_threshold(fed.strategy.clients_per_round(len(fed.parts), fed.cfg.fraction))


def contribution(fed: Federation, client: int, model: torch.Tensor, global_w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """What a client adds to a round's sum when the server never sees its update alone
    (--secagg, the collective all_reduce), and its update's norm: its sample count times its
    update, clipped to --max-update-norm by the client itself; under DP its update clipped to
    --dp-clip (equal weights). float64 (P,)."""
    cfg = fed.cfg
    delta = model.double() - global_w.double()
    norm = float(delta.norm())
    bounds = [b for b in (cfg.max_update_norm, cfg.dp_clip) if b is not None]
    if bounds:
        delta = delta * min(1.0, min(bounds) / max(norm, 1e-300))
    return (delta if cfg.dp_clip is not None else float(fed.counts[client]) * delta), norm


def contribution_weight(fed: Federation, client: int) -> float:
    """The weight of `client` in the round's mean: its sample count, 1 under DP-FedAvg."""
    return 1.0 if fed.cfg.dp_clip is not None else float(fed.counts[client])


def secagg_contribution(fed: Federation, client: int, model: torch.Tensor, global_w: torch.Tensor) -> np.ndarray:
    """What a client masks under --secagg: its `contribution`, under DP plus its share of the
    round's Gaussian noise."""
    cfg = fed.cfg
    value = contribution(fed, client, model, global_w)[0].numpy()
    if cfg.dp_clip is None:
        return value
    from mlsyskit.fl.privacy import client_noise

    return value + client_noise(len(value), dp_noise(cfg), cfg.dp_clip, secagg_threshold(fed))


def poison_update(fed: Federation, rnd: int, client: int, model: torch.Tensor, global_w: torch.Tensor) -> torch.Tensor:
    """What malicious `client` sends in round `rnd` (seeded by run, round and client)."""
    cfg = fed.cfg
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, rnd, client, 1]).integers(2**62)))
    return poison(cfg.attack, model, global_w, cfg.attack_scale, gen)


def setup(cfg: FLConfig) -> Federation:
    """Load data, split it across clients, build the model and the strategy."""
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    labels = data.train_y.numpy() if data.task == "image" else None
    parts = partition(
        labels, cfg.clients, cfg.partition, seed=cfg.seed, alpha=cfg.alpha, natural=data.natural_clients
    )
    if cfg.malicious > len(parts):
        raise UserError(f"--malicious {cfg.malicious} exceeds the {len(parts)} clients")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes, vocab_size=data.num_classes)
    if data.task == "image":
        # Channels-last from the start (evaluation runs faster in it), so every round of a
        # run, resumed or not, computes in the same layout and gives the same floats.
        model.to(memory_format=torch.channels_last)
    supports = bool(getattr(model, "supports_vmap", False))
    if cfg.client_exec == "vmap" and not supports:
        raise UserError(f"model {cfg.model!r} cannot train under vmap; use --client-exec sequential or auto")
    opts = StrategyOptions(
        mu=cfg.mu,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        trim_ratio=cfg.trim_ratio,
        krum_f=cfg.krum_f,
    )
    strategy = make_strategy(cfg.strategy, opts)
    strategy.check_round_size(strategy.clients_per_round(len(parts), cfg.fraction))
    return Federation(
        cfg=cfg,
        data=data,
        parts=parts,
        counts=np.array([len(p) for p in parts]),
        malicious=choose_malicious(len(parts), cfg.malicious, cfg.seed),
        model=model,
        strategy=strategy,
        vectorized=supports and cfg.client_exec != "sequential",
    )


def train_clients(fed: Federation, rnd: int, global_w: torch.Tensor, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Local training of the given clients; (K, P) models and (K,) mean losses."""
    cfg = fed.cfg
    local = LocalTraining(cfg.local_epochs, cfg.batch_size, cfg.lr, fed.strategy.fit_config()["mu"])
    flip = cfg.attack == "label-flip"
    bad = set(fed.malicious.tolist())
    train = train_vectorized if fed.vectorized else train_sequential
    chunk = cfg.parallel_clients if fed.vectorized else len(ids)
    models, losses = [], []
    for start in range(0, len(ids), chunk):
        group = ids[start : start + chunk]
        batch = ClientBatch(
            indices=[fed.parts[c] for c in group],
            plans=[batch_plan(fed.counts[c], cfg.batch_size, cfg.local_epochs, [cfg.seed, rnd, int(c)]) for c in group],
            flip_labels=[flip and int(c) in bad for c in group],
        )
        m, loss = train(fed.model, global_w, fed.data.train_x, fed.data.train_y, batch, local, fed.data.num_classes)
        models.append(m)
        losses.append(loss)
    return torch.cat(models), torch.cat(losses)


def run_round(fed: Federation, rnd: int, global_w: torch.Tensor, transport: Transport | None = None) -> RoundResult:
    """One communication round: sample, (drop out), send and collect through `transport`
    (default: in process), reject non-finite, aggregate."""
    cfg = fed.cfg
    transport = transport or InProcess()
    rng = np.random.default_rng([cfg.seed, rnd])
    sampled = fed.strategy.configure_fit(len(fed.parts), cfg.fraction, rng)
    active = sampled[rng.random(len(sampled)) >= cfg.dropout]
    dropout = sorted(set(sampled.tolist()) - set(active.tolist()))
    if len(active) == 0:
        # the simulation counts the model as sent to every sampled client, as before transports
        down = len(sampled) * 4 * fed.num_params if isinstance(transport, InProcess) else 0
        return RoundResult(global_w, sampled.tolist(), [], [], None, 0.0, dropped=dropout, bytes_down=down)
    got = transport.collect(fed, rnd, global_w, sampled, active)
    if got.summed is not None:
        return _reduced_round(fed, rnd, global_w, sampled, active, got, dropout)
    answered = set(got.ids) | set(got.malformed)
    trained = [int(c) for c in active if int(c) in answered]
    ids = np.array(got.ids, dtype=np.int64)
    models, losses = got.models, got.losses
    ok = finite_rows(models) if len(ids) else torch.zeros(0, dtype=torch.bool)
    nonfinite = ids[~ok.numpy()].tolist()
    rejected = sorted(got.malformed + nonfinite)
    note = _rejection_note(nonfinite, got.malformed)
    weights = torch.from_numpy(fed.counts[ids]).float()
    if cfg.dp_clip is not None:
        weights = torch.ones(len(ids))  # DP-FedAvg: equal weights bound each client's influence to C/K
    new_w = global_w
    if ok.any():
        accepted = models[ok]
        deltas = accepted.double() - global_w.double()  # float64: a 1e38-scaled update has a norm
        norms = deltas.norm(dim=1)
        bounds = [b for b in (cfg.max_update_norm, cfg.dp_clip) if b is not None]
        if bounds:
            factor = (min(bounds) / norms.clamp_min(1e-300)).clamp(max=1.0)
            accepted = (global_w.double() + deltas * factor[:, None]).to(models.dtype)
        if cfg.dp_clip is not None and dp_noise(cfg) > 0:
            # Gaussian noise z*C on the sum of the K clipped updates, i.e. z*C/K on their mean:
            # the same vector added to every row shifts any (weighted) mean by exactly that.
            accepted = (accepted.double() + server_noise(cfg, rnd, accepted.shape[1]) / len(accepted)).to(models.dtype)
        saved = {k: v.clone() for k, v in fed.strategy.state_dict().items()}
        new_w = fed.strategy.aggregate(global_w, accepted, weights[ok])
        # under DP the updates are clipped to C and the noise is deliberate: only finiteness counts
        why = _uncommittable(global_w, new_w, norms, check_step=cfg.dp_clip is None)
        if why:
            # Finite updates can still overflow when combined, or move the model by orders of
            # magnitude (huge scaled attacks, an adaptive server step): keep the old model and
            # the old server state.
            fed.strategy.load_state_dict(saved)
            new_w = global_w
            rejected = list(trained)
            note = f"aggregate not committed ({why}); the model stays as it was"
    return _round_result(got, losses, new_w, sampled, trained, rejected, note, dropout)


def _round_result(
    got: Collected, losses: torch.Tensor, new_w: torch.Tensor, sampled: np.ndarray, trained: list[int],
    rejected: list[int], note: str | None, dropout: list[int],
) -> RoundResult:
    """The round's record: the mean of the finite client losses, times and bytes from `got`."""
    finite_loss = losses[torch.isfinite(losses)]
    return RoundResult(
        global_w=new_w,
        sampled=sampled.tolist(),
        trained=trained,
        rejected=rejected,
        train_loss=float(finite_loss.mean()) if len(finite_loss) else None,
        train_s=got.train_s,
        note=note,
        dropped=sorted(dropout + got.missing),
        bytes_up=got.bytes_up,
        bytes_down=got.bytes_down,
        aggregation=got.aggregation,
    )


def _rejection_note(nonfinite: list[int], malformed: list[int]) -> str | None:
    notes = []
    if nonfinite:
        notes.append(f"rejected non-finite update(s) from client(s) {sorted(nonfinite)}")
    if malformed:
        notes.append(f"rejected malformed update(s) from client(s) {sorted(malformed)}")
    return "; ".join(notes) or None


def server_noise(cfg: FLConfig, rnd: int, size: int) -> torch.Tensor:
    """The round's DP noise on the sum of the clipped updates: N(0, (z*C)^2), float64 (seeded by run and round)."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, rnd, 2]).integers(2**62)))
    return torch.randn(size, generator=gen, dtype=torch.float64) * dp_noise(cfg) * cfg.dp_clip


def _reduced_round(
    fed: Federation, rnd: int, global_w: torch.Tensor, sampled: np.ndarray, active: np.ndarray, got: Collected, dropout: list[int]
) -> RoundResult:
    """Aggregate a round whose transport brought back only the sum of the clients'
    `contribution`s (--secagg: unmasked; collective: all_reduced): the weighted mean is
    global + sum / (sum of weights), then the strategy's server step on it."""
    cfg = fed.cfg
    answered = set(got.ids) | set(got.malformed) | set(got.nonfinite)
    trained = [int(c) for c in active if int(c) in answered]
    rejected = sorted(got.malformed + got.nonfinite)
    note = _rejection_note(got.nonfinite, got.malformed)
    new_w = global_w
    if got.ids:
        total = torch.as_tensor(got.summed, dtype=torch.float64)
        weight = sum(contribution_weight(fed, c) for c in got.ids)
        if cfg.dp_clip is not None and dp_noise(cfg) > 0 and not cfg.secagg:  # under --secagg the clients added it
            total = total + server_noise(cfg, rnd, len(total))
        mean_model = (global_w.double() + total / weight).to(global_w.dtype)
        saved = {k: v.clone() for k, v in fed.strategy.state_dict().items()}
        new_w = fed.strategy.aggregate(global_w, mean_model[None], torch.ones(1))
        # the step check needs the update norms, which --secagg hides
        check = cfg.dp_clip is None and got.norms is not None
        why = _uncommittable(global_w, new_w, got.norms if check else torch.zeros(1), check_step=check)
        if why:
            fed.strategy.load_state_dict(saved)
            new_w, rejected = global_w, list(trained)
            note = f"aggregate not committed ({why}); the model stays as it was"
    return _round_result(got, got.losses, new_w, sampled, trained, rejected, note, dropout)


def dp_noise(cfg: FLConfig) -> float:
    """The DP noise multiplier z in force (1.0 when only --dp-clip is given)."""
    return 1.0 if cfg.dp_noise_multiplier is None else cfg.dp_noise_multiplier


def _uncommittable(global_w: torch.Tensor, new_w: torch.Tensor, client_norms: torch.Tensor, check_step: bool = True) -> str | None:
    """Why the aggregate ``new_w`` must not replace ``global_w`` (None if it may)."""
    if not torch.isfinite(new_w).all():
        return "it is not finite"
    if not check_step:
        return None
    step = float((new_w.double() - global_w.double()).norm())
    # the smallest update, not the median: scaled attackers may be most of the round
    ref = max(float(global_w.double().norm()), float(client_norms.min()))
    if step > MAX_STEP_RATIO * ref:
        return (
            f"its step has norm {step:.3g}, more than {MAX_STEP_RATIO:g}x "
            f"max(model norm, smallest client update norm) = {ref:.3g}"
        )
    return None


def default_out(cfg: FLConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(cfg: FLConfig, *, progress: bool = True, stop_after: int | None = None, transport: Transport | None = None) -> dict[str, Any]:
    """Start a new run in `cfg.out`; returns the summary (also written to summary.json).

    `stop_after` ends the process's work after that round as if it were killed there
    (used to test `--resume`); the run directory is left resumable. `transport` reaches the
    clients (default: simulated in this process).
    """
    cfg = cfg.resolved()
    out = rundir.new_run_dir(Path(cfg.out) if cfg.out else default_out(cfg))
    # Record where the data really came from, so --resume rebuilds the same data set
    # whatever the environment or working directory is then.
    data_dir = resolve_data_dir(cfg.data_dir)
    cfg = dataclasses.replace(cfg, out=str(out), data_dir=str(data_dir.resolve()) if data_dir else None)
    if progress:
        print(f"run directory: {out} (continue a killed run with --resume {out})", file=sys.stderr)
    fed = setup(cfg)
    rundir.write_json(out / rundir.CONFIG, cfg.to_json())
    stats = partition_stats(fed.parts, fed.data.train_y.numpy() if fed.data.task == "image" else None, fed.data.num_classes if fed.data.task == "image" else None)
    stats.update(
        clients=len(fed.parts),
        scheme=cfg.partition,
        malicious=fed.malicious.tolist(),
        client_names=_role_names(fed) if cfg.partition == "natural" else None,
        test_source=fed.data.test_source,
    )
    rundir.write_json(out / rundir.PARTITION, stats)
    return _loop(fed, out, [], start=0, global_w=get_flat(fed.model), progress=progress, stop_after=stop_after, transport=transport)


def _role_names(fed: Federation) -> list[str] | None:
    """Names of the natural clients (roles) that the partition chose, in client order."""
    names, natural = fed.data.client_names, fed.data.natural_clients
    if names is None or natural is None:
        return None
    by_first = {int(idx[0]): name for idx, name in zip(natural, names, strict=True) if len(idx)}
    return [by_first.get(int(p[0]), "?") for p in fed.parts]


RESUME_OVERRIDES = ("rounds", "target_accuracy", "eval_every", "checkpoint_every", "parallel_clients", "threads")


def resume(
    run_dir: str | Path, overrides: dict[str, Any] | None = None, *, progress: bool = True, stop_after: int | None = None, transport: Transport | None = None
) -> dict[str, Any]:
    """Continue a killed (or finished) run from its last checkpoint, with its saved config.

    Only the fields in RESUME_OVERRIDES may change; anything else would change the
    trajectory, so it is refused.
    """
    out = Path(run_dir)
    if not (out / rundir.CONFIG).exists():
        raise UserError(f"--resume {out}: no {rundir.CONFIG} there; pass the --out folder of an earlier run")
    saved = FLConfig.from_json(out / rundir.CONFIG)
    overrides = dict(overrides or {})
    if overrides.get("data_dir"):  # the run recorded it resolved: compare like with like
        overrides["data_dir"] = str(resolve_data_dir(overrides["data_dir"]).resolve())
    changed = {k: v for k, v in overrides.items() if getattr(saved, k) != v}
    bad = sorted(set(changed) - set(RESUME_OVERRIDES))
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise UserError(f"--resume continues a run with its saved config; {flags} cannot change (start a new run with --out)")
    cfg = dataclasses.replace(saved, **changed).resolved()
    fed = setup(cfg)
    recorded = rundir.read_json(out / rundir.PARTITION).get("sample_counts")
    if recorded is not None and recorded != fed.counts.tolist():
        raise UserError(
            f"the data found now ({fed.data.test_source.split(';')[0]}) split differently from the run in {out}; "
            "resume with the same data folder (--data-dir) it started with"
        )
    rnd, global_w, state = rundir.load_checkpoint(out)
    if rnd == 0:
        global_w = get_flat(fed.model)
    elif global_w.numel() != fed.num_params:
        raise UserError(f"checkpoint in {out} does not match model {cfg.model!r}; start a new run")
    fed.strategy.load_state_dict(state)
    rows = rundir.read_metrics(out, upto_round=rnd)
    rundir.rewrite_metrics(out, rows)
    rundir.write_json(out / rundir.CONFIG, cfg.to_json())
    return _loop(fed, out, rows, start=rnd, global_w=global_w, progress=progress, stop_after=stop_after, transport=transport)


def _loop(
    fed: Federation,
    out: Path,
    rows: list[dict[str, Any]],
    *,
    start: int,
    global_w: torch.Tensor,
    progress: bool,
    stop_after: int | None,
    transport: Transport | None = None,
) -> dict[str, Any]:
    """Rounds start+1..R through `transport`; `rows` are the metrics already on disk (a resumed run's)."""
    transport = transport or InProcess()
    transport.start(fed)
    try:
        return _rounds(fed, out, rows, start=start, global_w=global_w, progress=progress, stop_after=stop_after, transport=transport)
    finally:
        transport.close()


def _rounds(
    fed: Federation,
    out: Path,
    rows: list[dict[str, Any]],
    *,
    start: int,
    global_w: torch.Tensor,
    progress: bool,
    stop_after: int | None,
    transport: Transport,
) -> dict[str, Any]:
    cfg = fed.cfg
    bar = tqdm(total=cfg.rounds, initial=start, desc=f"{cfg.strategy} {cfg.dataset}", unit="round", file=sys.stderr, disable=not progress)
    reached = next((r["round"] for r in rows if cfg.target_accuracy and (r.get("test_accuracy") or 0) >= cfg.target_accuracy), None)
    rnd = start
    stalled = 0
    for rnd in range(start + 1, cfg.rounds + 1):
        if reached is not None:
            break
        t0 = time.perf_counter()
        res = run_round(fed, rnd, global_w, transport)
        global_w = res.global_w
        row: dict[str, Any] = {"round": rnd, "test_accuracy": None, "test_loss": None}
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            acc, loss = evaluate(fed.model, global_w, fed.data.test_x, fed.data.test_y)
            row.update(test_accuracy=acc, test_loss=loss)
        row.update(
            train_loss=res.train_loss,
            clients=len(res.trained),
            sampled=len(res.sampled),
            rejected=res.rejected,
            dropped=res.dropped,
            bytes_up=res.bytes_up,
            bytes_down=res.bytes_down,
            train_s=round(res.train_s, 4),
            wall_s=round(time.perf_counter() - t0, 4),
        )
        if res.aggregation:
            row["aggregation"] = res.aggregation
        if cfg.dp_clip is not None:
            from mlsyskit.fl.privacy import epsilon

            q = fed.strategy.clients_per_round(len(fed.parts), cfg.fraction) / len(fed.parts)
            row.update(epsilon=epsilon(q, dp_noise(cfg), rnd, cfg.dp_delta), delta=cfg.dp_delta)
        if res.note:
            tqdm.write(f"round {rnd}: {res.note}", file=sys.stderr)
        rundir.append_metrics(out, row)
        rows.append(row)
        # trained clients but nothing committed: the model did not change this round
        if res.trained:
            stalled = stalled + 1 if len(res.rejected) == len(res.trained) else 0
        if stalled >= STALL_ROUNDS:
            bar.close()
            rundir.save_checkpoint(out, rnd, global_w, fed.strategy.state_dict())
            why = (
                f"stopped after round {rnd}: no client update was committed in the last {stalled} rounds "
                "(see the rejected column of metrics.jsonl), so the model cannot change"
            )
            finish(fed, out, rows, global_w, reached, stopped=why)
            raise UserError(
                f"{why}; a robust --strategy (median, trimmed-mean, krum) or --max-update-norm "
                f"limits malicious updates; outputs so far in {out}/"
            )
        if rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds:
            rundir.save_checkpoint(out, rnd, global_w, fed.strategy.state_dict())
        if row["test_accuracy"] is not None:
            bar.set_postfix(acc=f"{row['test_accuracy']:.4f}")
            if cfg.target_accuracy and row["test_accuracy"] >= cfg.target_accuracy:
                reached = rnd
                rundir.save_checkpoint(out, rnd, global_w, fed.strategy.state_dict())
        bar.update(1)
        if stop_after is not None and rnd >= stop_after:
            bar.close()
            return {"stopped_at": rnd}
    bar.close()
    return finish(fed, out, rows, global_w, reached)


def finish(
    fed: Federation, out: Path, rows: list[dict[str, Any]], global_w: torch.Tensor, reached: int | None, stopped: str | None = None
) -> dict[str, Any]:
    """Write the final model, summary.json and accuracy.png (``stopped``: why the run ended early)."""
    cfg = fed.cfg
    set_flat(fed.model, global_w)
    rundir.save_tensors(out / rundir.MODEL, dict(fed.model.state_dict()), {"model": cfg.model, "dataset": cfg.dataset})
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    best = max(evals, key=lambda r: r["test_accuracy"], default=None)
    summary = {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "strategy": cfg.strategy,
        "partition": cfg.partition,
        "clients": len(fed.parts),
        "parameters": fed.num_params,
        "client_exec": "vmap" if fed.vectorized else "sequential",
        "test_source": fed.data.test_source,
        "rounds_run": rows[-1]["round"] if rows else 0,
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "final_loss": evals[-1]["test_loss"] if evals else None,
        "best_accuracy": best["test_accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "target_accuracy": cfg.target_accuracy,
        "rounds_to_target": reached,
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "mean_round_s": float(np.mean([r["wall_s"] for r in rows])) if rows else None,
        "mean_train_s": float(np.mean([r["train_s"] for r in rows])) if rows else None,
        "rejected_updates": sum(len(r["rejected"]) for r in rows),
        "stopped_early": stopped,
        "out": str(out),
    }
    rundir.write_json(out / rundir.SUMMARY, summary)
    rundir.plot_accuracy(out, rows, f"{cfg.strategy} on {cfg.dataset} ({cfg.model}, {len(fed.parts)} clients)")
    return summary
