"""Server strategies behind one small interface (the role of Flower's `Strategy`).

A strategy chooses the round's clients (`configure_fit`), tells them how to train
(`fit_config`), and turns their returned models into the next global model (`aggregate`).
Client results arrive as a (K, P) matrix of client models and a (K,) vector of sample
counts; every rule below is the formula from its paper on that matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mlsyskit.errors import UserError


@dataclass
class StrategyOptions:
    """Hyper-parameters shared by the strategies (each uses the ones it needs)."""

    mu: float = 0.01  # FedProx proximal weight
    server_lr: float | None = None  # server step size; None: 1.0 (FedAvgM), 0.01 (adaptive)
    server_momentum: float = 0.9  # FedAvgM
    beta1: float = 0.9  # FedAdam/FedYogi first moment
    beta2: float = 0.99  # FedAdam/FedYogi second moment
    tau: float = 1e-3  # adaptivity (epsilon) of FedAdam/FedYogi/FedAdagrad
    trim_ratio: float = 0.1  # trimmed mean: fraction cut from each end per coordinate
    krum_f: int = 1  # Krum: number of Byzantine clients tolerated
    multi_krum_m: int | None = None  # Multi-Krum: models averaged (default K - f)


def weighted_mean(models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """McMahan's server average: sum_k n_k w_k / sum_k n_k."""
    w = weights.to(models.dtype)
    return (w / w.sum()) @ models


class Strategy:
    """FedAvg (McMahan et al. 2017): sample-count-weighted average of client models."""

    name = "fedavg"
    _state_keys: tuple[str, ...] = ()  # server state tensors (optimizer moments), None until used

    def __init__(self, opts: StrategyOptions | None = None) -> None:
        self.opts = opts or StrategyOptions()

    @staticmethod
    def clients_per_round(num_clients: int, fraction: float) -> int:
        """m = max(round(C * N), 1): how many clients a round samples."""
        return max(int(round(fraction * num_clients)), 1)

    def check_round_size(self, per_round: int) -> None:
        """Refuse (UserError) a configuration this rule cannot aggregate soundly with
        ``per_round`` clients a round; every rule but Krum works with any number."""

    def configure_fit(
        self, num_clients: int, fraction: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Sample m = max(round(C * N), 1) distinct clients, sorted."""
        m = self.clients_per_round(num_clients, fraction)
        return np.sort(rng.choice(num_clients, size=m, replace=False))

    def fit_config(self) -> dict[str, float]:
        """Options sent to clients with the model (FedProx adds mu)."""
        return {"mu": 0.0}

    def aggregate(
        self, global_w: torch.Tensor, models: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return weighted_mean(models, weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server state to checkpoint (optimizer moments); empty for stateless rules."""
        return {k: getattr(self, k) for k in self._state_keys if getattr(self, k, None) is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`'s output exactly (keys it lacks go back to unset)."""
        for key in self._state_keys:
            setattr(self, key, state[key].clone() if key in state else None)


class FedProx(Strategy):
    """FedProx (Li et al. 2020): FedAvg whose clients add (mu/2)||w - w_global||^2."""

    name = "fedprox"

    def fit_config(self) -> dict[str, float]:
        return {"mu": self.opts.mu}


class _ServerOptimizer(Strategy):
    """Treat delta = avg(client models) - global as a pseudo-gradient (Reddi et al. 2021).

    The average is weighted by sample counts, as in FedAvg (the paper's Algorithm 2 uses a
    plain mean over clients; with equal client sizes the two agree).
    """

    default_server_lr = 1.0

    @property
    def server_lr(self) -> float:
        lr = self.opts.server_lr
        return self.default_server_lr if lr is None else lr

    def aggregate(
        self, global_w: torch.Tensor, models: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        delta = weighted_mean(models, weights) - global_w
        for key in self._state_keys:
            if getattr(self, key, None) is None:
                setattr(self, key, self._init_state(key, delta))
        return global_w + self.step(delta)

    def _init_state(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(delta)

    def step(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FedAvgM(_ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): server momentum v = beta v + delta; w += eta v."""

    name = "fedavgm"
    _state_keys = ("momentum",)

    def step(self, delta: torch.Tensor) -> torch.Tensor:
        self.momentum = self.opts.server_momentum * self.momentum + delta
        return self.server_lr * self.momentum


class _Adaptive(_ServerOptimizer):
    """Shared update of FedAdam/FedYogi/FedAdagrad: w += eta * m / (sqrt(v) + tau)."""

    _state_keys = ("m", "v")
    default_server_lr = 0.01

    def _init_state(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        # v starts at tau^2 as in Reddi et al.'s Algorithm 2.
        return torch.full_like(delta, self.opts.tau**2) if key == "v" else torch.zeros_like(delta)

    def second_moment(self, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, delta: torch.Tensor) -> torch.Tensor:
        b1 = self.opts.beta1
        self.m = b1 * self.m + (1 - b1) * delta
        self.v = self.second_moment(delta * delta)
        return self.server_lr * self.m / (self.v.sqrt() + self.opts.tau)


class FedAdam(_Adaptive):
    name = "fedadam"

    def second_moment(self, d2: torch.Tensor) -> torch.Tensor:
        b2 = self.opts.beta2
        return b2 * self.v + (1 - b2) * d2


class FedYogi(_Adaptive):
    name = "fedyogi"

    def second_moment(self, d2: torch.Tensor) -> torch.Tensor:
        return self.v - (1 - self.opts.beta2) * d2 * torch.sign(self.v - d2)


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def second_moment(self, d2: torch.Tensor) -> torch.Tensor:
        return self.v + d2


class Median(Strategy):
    """Coordinate-wise median of client models (Yin et al. 2018); ignores sample counts."""

    name = "median"

    def aggregate(
        self, global_w: torch.Tensor, models: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        k = models.shape[0]
        s = models.sort(dim=0).values
        return s[(k - 1) // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean: drop the floor(beta*K) largest and smallest values."""

    name = "trimmed-mean"

    def aggregate(
        self, global_w: torch.Tensor, models: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        k = models.shape[0]
        cut = int(math.floor(self.opts.trim_ratio * k))
        if k - 2 * cut < 1:
            cut = (k - 1) // 2
        s = models.sort(dim=0).values
        return s[cut : k - cut].mean(dim=0)


def krum_scores(models: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each model: sum of squared distances to its K - f - 2 nearest others."""
    k = models.shape[0]
    x = models.double()
    d = torch.cdist(x, x).pow(2)
    d.fill_diagonal_(float("inf"))
    nearest = max(k - f - 2, 1)
    return d.topk(min(nearest, k - 1), dim=1, largest=False).values.sum(dim=1)


class MultiKrum(Strategy):
    """Multi-Krum (Blanchard et al. 2017): average the m best Krum-scored models (m = K - f)."""

    name = "multi-krum"

    def keep(self, k: int) -> int:
        return self.opts.multi_krum_m or max(k - self.opts.krum_f, 1)

    def check_round_size(self, per_round: int) -> None:
        """Krum's guarantee needs n > 2f + 2 models a round (Blanchard et al. 2017)."""
        f = self.opts.krum_f
        if per_round > 2 * f + 2:
            return
        fix = (
            f"use --krum-f {(per_round - 3) // 2} or less, or sample more clients a round"
            if per_round >= 3
            else "sample at least 3 clients a round (--fraction, --clients)"
        )
        raise UserError(
            f"--strategy {self.name} with --krum-f {f} needs more than 2f + 2 = {2 * f + 2} "
            f"clients a round, but a round samples {per_round}; {fix}"
        )

    def aggregate(
        self, global_w: torch.Tensor, models: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        k = models.shape[0]
        if k <= 2:  # no neighbours to score against
            return models.mean(dim=0)
        best = krum_scores(models, self.opts.krum_f).argsort()[: min(self.keep(k), k)]
        return models[best].mean(dim=0)


class Krum(MultiKrum):
    """Krum: keep the single model closest to its neighbours."""

    name = "krum"

    def keep(self, k: int) -> int:
        return 1


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        Strategy,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
    )
}


def make_strategy(name: str, opts: StrategyOptions | None = None) -> Strategy:
    """Build a strategy by its CLI name."""
    if name not in STRATEGIES:
        raise UserError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[name](opts)
