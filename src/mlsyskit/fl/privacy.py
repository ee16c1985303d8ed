"""Client-level differential privacy for FedAvg (DP-FedAvg, McMahan et al. 2018).

Each client's update is clipped to L2 norm C, the round's clients are weighted equally, and
Gaussian noise of standard deviation z * C is added to the sum of their updates (z * C / K on
the mean of K updates). The server adds it; under secure aggregation it never sees an update,
so each client adds its share instead (`client_noise`): std z * C / sqrt(t) from its own
entropy, t the secure-aggregation threshold. A round unmasks only with at least t clients, so
the sum carries at least std z * C (exactly that with t clients) and the same accounting
holds. The privacy spent is accounted by Google's `dp-accounting` (its RDP accountant), not by
a home-made formula.
"""

from __future__ import annotations

import math

import numpy as np

# integer Renyi orders: the accountant's fractional-order series is slow and noisy for large q
ORDERS = [*range(2, 65), 80, 96, 128, 192, 256, 512]


def epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of `rounds` rounds of the sampled Gaussian mechanism (inf if z = 0).

    Sampling is treated as Poisson with rate q = clients per round / clients, the usual
    approximation for FedAvg's fixed-size sampling (as in McMahan et al. 2018).
    """
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_event.PoissonSampledDpEvent(sampling_rate, event)
    accountant = rdp_privacy_accountant.RdpAccountant(ORDERS)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def client_noise(n: int, noise_multiplier: float, clip: float, threshold: int) -> np.ndarray:
    """One client's share of the round's DP noise: n draws of N(0, (z C)^2 / t).

    Drawn from the OS's entropy, never from the run's seed: the server must not be able to
    regenerate (and subtract) it.
    """
    return np.random.default_rng().normal(0.0, noise_multiplier * clip / math.sqrt(threshold), n)
