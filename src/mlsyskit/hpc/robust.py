"""Robust aggregation of client updates for `mlsyskit hpc logreg`, in numpy.

The same rules as ``mlsyskit.fl.strategies`` (coordinate-wise median, trimmed mean, Krum,
Blanchard et al. 2017) in a few lines each: hpc and fl are sibling packages and may not import
each other. Plus a detector: clients whose update is far from the coordinate-wise median.
"""

from __future__ import annotations

import numpy as np

from mlsyskit.errors import UserError

STRATEGIES = ("mean", "median", "trimmed-mean", "krum")


def aggregate(updates: np.ndarray, weights: np.ndarray, strategy: str, *, trim_ratio: float = 0.25,
              krum_f: int = 1) -> np.ndarray:
    """One update from the clients' (rows of ``updates``). mean: weighted by ``weights``
    (samples per client); the robust rules ignore the weights."""
    n = len(updates)
    if strategy == "mean":
        return (weights[:, None] * updates).sum(0) / weights.sum()
    if strategy == "median":
        return np.median(updates, axis=0)
    if strategy == "trimmed-mean":
        cut = int(trim_ratio * n)
        s = np.sort(updates, axis=0)
        return s[cut:n - cut].mean(0)
    if strategy == "krum":
        if n <= 2 * krum_f + 2:
            raise UserError(f"krum tolerating f={krum_f} needs more than 2f + 2 = {2 * krum_f + 2} clients; got {n}")
        d = ((updates[:, None, :] - updates[None, :, :]) ** 2).sum(-1)
        scores = np.sort(d, axis=1)[:, 1:n - krum_f - 1].sum(1)  # nearest n - f - 2, self excluded
        return updates[int(np.argmin(scores))]
    raise UserError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def flag_outliers(updates: np.ndarray, threshold: float = 3.0) -> list[int]:
    """Indices of updates whose distance to the coordinate-wise median is more than
    ``threshold`` times the median of those distances."""
    dist = np.linalg.norm(updates - np.median(updates, axis=0), axis=1)
    ref = float(np.median(dist))
    if ref == 0:
        return [i for i, d in enumerate(dist) if d > 0]
    return [i for i, d in enumerate(dist) if d > threshold * ref]
