"""The configuration of one federated run: every CLI flag of `mlsyskit fedavg`.

Each field's metadata holds its flag help, so `--help` is generated from this one place.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError

ATTACKS = ("sign-flip", "scale", "noise", "label-flip", "nan")
CLIENT_EXEC = ("auto", "vmap", "sequential")
ROBUST = ("median", "trimmed-mean", "krum", "multi-krum")  # not a mean: no DP noise calibration
DEFAULT_LR = {"lstm": 1.47, "transformer": 0.5}  # image models: 0.05
# the collective transport's --aggregation: auto is all-reduce for a mean-based strategy, gather for ROBUST
AGGREGATIONS = ("auto", "all-reduce", "gather")


def aggregation_mode(strategy: str, asked: str = "auto") -> str:
    """How the collective transport aggregates `strategy` (`asked`: --aggregation): all-reduce
    (one weighted sum) or gather (every update to rank 0); UserError if impossible."""
    if asked not in AGGREGATIONS:
        raise UserError(f"--aggregation {asked!r}: choose one of {', '.join(AGGREGATIONS)}")
    robust = strategy in ROBUST
    if asked == "all-reduce" and robust:
        raise UserError(f"--aggregation all-reduce only sums the updates; --strategy {strategy} needs each of them (use gather or auto)")
    return "gather" if robust or asked == "gather" else "all-reduce"


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FLConfig:
    dataset: str = _f("mnist-5k", "data set: mnist, mnist-5k or shakespeare")
    data_dir: str | None = _f(None, "folder with the data files (default: $MLSYSKIT_DATA_DIR, then the cache, then download)")
    model: str | None = _f(None, "model: 2nn, cnn, mlp, logreg (images), lstm, transformer (shakespeare); default cnn for images, lstm for shakespeare")
    clients: int | None = _f(None, "number of clients N (default 100; for --partition natural, all speaking roles)")
    partition: str | None = _f(None, "how data is split: iid, shards (2 label-sorted shards per client), dirichlet (label skew), natural (one client per role); default iid for images, natural for shakespeare")
    alpha: float = _f(0.5, "Dirichlet concentration for --partition dirichlet (smaller = more skew)")
    fraction: float = _f(0.1, "client fraction C sampled each round, in (0, 1]")
    local_epochs: int = _f(5, "local epochs E per round")
    batch_size: int | None = _f(10, "local batch size B, or 'full' for the whole client data set (FedSGD is E=1, B=full)", metavar="B|full")
    lr: float | None = _f(None, "client learning rate, plain SGD (default 0.05 for image models, 1.47 for the lstm as in McMahan et al., 0.5 for the transformer)")
    rounds: int = _f(20, "communication rounds")
    strategy: str = _f("fedavg", "server strategy: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed-mean, krum, multi-krum")
    mu: float = _f(0.01, "FedProx proximal weight mu")
    server_lr: float | None = _f(None, "server learning rate for fedavgm/fedadam/fedyogi/fedadagrad (default 1.0 for fedavgm, 0.01 for the adaptive ones)")
    server_momentum: float = _f(0.9, "server momentum for fedavgm")
    trim_ratio: float = _f(0.1, "fraction trimmed from each end per coordinate by trimmed-mean, in [0, 0.5)")
    krum_f: int = _f(1, "Byzantine clients tolerated by krum/multi-krum (needs more than 2f + 2 clients a round)")
    max_update_norm: float | None = _f(None, "clip each client's update (its model minus the global model) to this L2 norm before aggregation, as in DP-FedAvg; bounds what one client can move the model", metavar="C")
    dp_clip: float | None = _f(None, "client-level differential privacy (DP-FedAvg): clip each update to this L2 norm, weight the round's clients equally and add Gaussian noise of std --dp-noise-multiplier x C to their sum (with --secagg each client adds its share of it); epsilon at --dp-delta goes to metrics.jsonl", metavar="C")
    dp_noise_multiplier: float | None = _f(None, "noise multiplier z of DP-FedAvg (needs --dp-clip; default 1.0 with --dp-clip)", metavar="Z")
    dp_delta: float = _f(1e-5, "delta at which the privacy accountant reports epsilon")
    secagg: bool = _f(False, "secure aggregation (SecAgg: pairwise X25519 masks, fixed point mod 2^32, Shamir shares of the mask keys): the server sees only masked updates and their sum, also when clients drop after sharing; fedavg-family strategies only, no --malicious")
    secagg_threshold: int | None = _f(None, "--secagg: clients that must answer for the server to unmask a round's sum (Shamir threshold t; default: a majority of the clients sampled a round)", metavar="T")
    compress: str | None = _f(None, "compress client updates on the wire: int8 (the update quantized by mlsyskit.quant, one scale per block of 256: ~4x fewer bytes up; not with --secagg)")
    malicious: int = _f(0, "number of malicious clients (a fixed, seeded subset)")
    attack: str = _f("sign-flip", "what malicious clients send: sign-flip, scale, noise, label-flip, nan")
    attack_scale: float = _f(10.0, "strength of sign-flip (-s * update), scale (s * update) and noise (std s * update std)")
    dropout: float = _f(0.0, "probability that a sampled client drops out of a round, in [0, 1)")
    seed: int = _f(0, "random seed: same seed, same run")
    target_accuracy: float | None = _f(None, "stop at the first evaluated round whose test accuracy reaches this, in (0, 1]")
    eval_every: int = _f(1, "evaluate on the test set every this many rounds (and always on the last)")
    client_exec: str = _f("auto", "how sampled clients train: vmap (vectorized over clients), sequential (the naive reference loop), auto (vmap where the model allows, else sequential)")
    parallel_clients: int = _f(64, "clients trained at once by the vectorized path (bounds memory)")
    threads: int | None = _f(None, "CPU threads for torch (default: all cores; on a busy shared machine 1 can be much faster, above all for the LSTM)")
    checkpoint_every: int = _f(1, "write a resumable checkpoint every this many rounds")
    out: str | None = _f(None, "run directory for outputs (default runs/<dataset>-<strategy>-<time>)")

    def resolved(self) -> FLConfig:
        """Fill the dataset-dependent defaults and check every value."""
        char = self.dataset == "shakespeare"
        partition = self.partition or ("natural" if char else "iid")
        default_clients = None if partition == "natural" else 100
        model = self.model or ("lstm" if char else "cnn")
        cfg = dataclasses.replace(
            self,
            model=model,
            lr=self.lr if self.lr is not None else DEFAULT_LR.get(model, 0.05),
            partition=partition,
            clients=self.clients if self.clients is not None else default_clients,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from mlsyskit.data import DATASETS, PARTITIONS
        from mlsyskit.fl.strategies import STRATEGIES
        from mlsyskit.models import CHAR_MODELS, IMAGE_MODELS, MODEL_NAMES

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        need(self.model in MODEL_NAMES, f"unknown model {self.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
        char = self.dataset == "shakespeare"
        need(
            self.model in (CHAR_MODELS if char else IMAGE_MODELS),
            f"model {self.model!r} does not fit dataset {self.dataset!r}; use one of: "
            + ", ".join(CHAR_MODELS if char else IMAGE_MODELS),
        )
        need(self.partition in PARTITIONS, f"unknown partition {self.partition!r}; choose one of: {', '.join(PARTITIONS)}")
        need(self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        need(self.attack in ATTACKS, f"unknown attack {self.attack!r}; choose one of: {', '.join(ATTACKS)}")
        need(self.client_exec in CLIENT_EXEC, f"unknown --client-exec {self.client_exec!r}; choose one of: {', '.join(CLIENT_EXEC)}")
        need(self.clients is None or self.clients >= 1, f"--clients must be at least 1 (got {self.clients})")
        need(0 < self.fraction <= 1, f"--fraction must be in (0, 1] (got {self.fraction}); e.g. --fraction 0.1")
        need(self.lr is None or self.lr > 0, f"--lr must be positive (got {self.lr}); e.g. --lr 0.05")
        need(self.local_epochs >= 1, f"--local-epochs must be at least 1 (got {self.local_epochs})")
        need(self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1 or 'full' (got {self.batch_size})")
        need(self.rounds >= 1, f"--rounds must be at least 1 (got {self.rounds})")
        need(self.alpha > 0, f"--alpha must be positive (got {self.alpha})")
        need(self.mu >= 0, f"--mu must be >= 0 (got {self.mu})")
        need(self.server_lr is None or self.server_lr > 0, f"--server-lr must be positive (got {self.server_lr})")
        need(0 <= self.server_momentum < 1, f"--server-momentum must be in [0, 1) (got {self.server_momentum})")
        need(0 <= self.trim_ratio < 0.5, f"--trim-ratio must be in [0, 0.5) (got {self.trim_ratio})")
        need(self.krum_f >= 0, f"--krum-f must be >= 0 (got {self.krum_f})")
        need(
            self.max_update_norm is None or 0 < self.max_update_norm < float("inf"),
            f"--max-update-norm must be positive and finite (got {self.max_update_norm})",
        )
        need(self.dp_clip is None or 0 < self.dp_clip < float("inf"), f"--dp-clip must be positive and finite (got {self.dp_clip})")
        need(self.dp_noise_multiplier is None or self.dp_clip is not None, "--dp-noise-multiplier needs --dp-clip C (the norm the noise is scaled to)")
        need(self.dp_noise_multiplier is None or self.dp_noise_multiplier >= 0, f"--dp-noise-multiplier must be >= 0 (got {self.dp_noise_multiplier})")
        need(0 < self.dp_delta < 1, f"--dp-delta must be in (0, 1) (got {self.dp_delta})")
        need(
            self.dp_clip is None or self.strategy not in ROBUST,
            f"--dp-clip calibrates noise to a mean of clipped updates; --strategy {self.strategy} is not a mean "
            "(use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad)",
        )
        if self.secagg:
            need(self.strategy not in ROBUST, f"--secagg: the server only sees the sum of masked updates; --strategy {self.strategy} needs each update (use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad)")
            need(self.malicious == 0, "--secagg hides each update from the server, so --malicious attacks cannot be simulated with it")
        need(self.secagg_threshold is None or self.secagg, "--secagg-threshold needs --secagg")
        need(self.compress in (None, "int8"), f"unknown --compress {self.compress!r}; choose int8")
        need(not (self.compress and self.secagg), "--compress int8 with --secagg: masked updates are uniform 32-bit words and do not compress; use one or the other")
        need(self.secagg_threshold is None or self.secagg_threshold >= 1, f"--secagg-threshold must be at least 1 (got {self.secagg_threshold})")
        need(self.malicious >= 0, f"--malicious must be >= 0 (got {self.malicious})")
        need(
            self.clients is None or self.malicious <= self.clients,
            f"--malicious {self.malicious} exceeds --clients {self.clients}",
        )
        need(self.attack_scale > 0, f"--attack-scale must be positive (got {self.attack_scale})")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1) (got {self.dropout})")
        need(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            f"--target-accuracy must be in (0, 1] (got {self.target_accuracy}); e.g. 0.97",
        )
        need(self.eval_every >= 1, f"--eval-every must be at least 1 (got {self.eval_every})")
        need(self.parallel_clients >= 1, f"--parallel-clients must be at least 1 (got {self.parallel_clients})")
        need(self.threads is None or self.threads >= 1, f"--threads must be at least 1 (got {self.threads})")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        if self.clients is not None:  # else known once the data are split (checked again there)
            from mlsyskit.fl.strategies import StrategyOptions, make_strategy

            strategy = make_strategy(self.strategy, StrategyOptions(krum_f=self.krum_f))
            per_round = strategy.clients_per_round(self.clients, self.fraction)
            strategy.check_round_size(per_round)
            need(
                self.secagg_threshold is None or self.secagg_threshold <= per_round,
                f"--secagg-threshold {self.secagg_threshold} exceeds the {per_round} clients sampled a round",
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: Path) -> FLConfig:
        try:
            data = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"cannot read run config {path}: {e}") from None
