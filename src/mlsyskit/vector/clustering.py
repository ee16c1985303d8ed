"""KMeans (Lloyd's algorithm): Euclidean, and spherical for the cosine metric.

- l2: minimizes the inertia sum |x - c|^2; a centroid is the mean of its points.
- cosine (spherical KMeans): rows are scaled to unit length, the inertia is the sum of cosine
  distances 1 - cos(x, c), a centroid is its points' normalized sum (unit length). A zero row
  has distance 1 to every centroid and does not move any centroid.

Each iteration assigns every point to its nearest centroid (the back end's assignment step)
and recomputes the centroids. A cluster left empty is re-seeded with the point farthest from
its centroid (the largest cost; ties by lower index), which can only lower the inertia, so
the inertia never increases from one iteration to the next (up to float32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from mlsyskit.errors import UserError
from mlsyskit.vector._validate import as_matrix, check_metric, check_positive_int
from mlsyskit.vector.backends import Backend, get_backend
from mlsyskit.vector.backends.base import prepare_rows

INITS = ("k-means++", "random")


@dataclass
class KMeansResult:
    """What `kmeans` found and how it got there."""

    centroids: np.ndarray  # (k, d) float32; unit rows for cosine
    labels: np.ndarray  # (n,) int64: the nearest centroid of each point
    inertia: float  # sum of squared L2 distances (l2) or of cosine distances (cosine)
    n_iter: int  # Lloyd iterations run (each: update centroids, then reassign)
    converged: bool  # stopped by tol or by unchanged labels, not by max_iter
    inertia_history: list[float] = field(default_factory=list)  # initial, then after each iteration
    n_reseeded: int = 0  # empty clusters re-seeded over the run


def _kmeanspp(x: np.ndarray, k: int, metric: str, rng: np.random.Generator, be: Backend) -> np.ndarray:
    """k-means++ seeding: each next centroid is drawn with probability proportional to its cost."""
    n = x.shape[0]
    chosen = [int(rng.integers(n))]
    cost = be.assign(x, x[chosen[-1]][None], metric)[1].astype(np.float64)
    for _ in range(1, k):
        total = cost.sum()
        if total > 0:
            cum = np.cumsum(cost)
            nxt = int(min(n - 1, np.searchsorted(cum, rng.random() * cum[-1], side="right")))
        else:  # every point already coincides with a centroid: any unchosen point will do
            rest = np.setdiff1d(np.arange(n), chosen)
            nxt = int(rng.choice(rest)) if rest.size else int(rng.integers(n))
        chosen.append(nxt)
        cost = np.minimum(cost, be.assign(x, x[nxt][None], metric)[1])
    return x[chosen].copy()


def kmeans(
    x: Any,
    k: int,
    metric: str = "l2",
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    init: str | Any = "k-means++",
    backend: str = "torch",
    progress: bool = False,
) -> KMeansResult:
    """Cluster the rows of `x` (n, d) into k clusters (``progress``: a bar over the iterations).

    metric: "l2" or "cosine" (spherical). Stops after max_iter iterations, when the labels no
    longer change, or when an iteration lowers the inertia by at most tol times its previous
    value (converged). init: "k-means++" (D^2 sampling), "random" (k distinct rows) or a
    (k, d) array of starting centroids. The run is deterministic for a given seed and back end.
    """
    metric = check_metric(metric, allowed=("l2", "cosine"))
    be = get_backend(backend)
    if isinstance(init, str) and init not in INITS:
        raise UserError(f"unknown init {init!r}; choose one of {', '.join(INITS)} or pass (k, d) centroids")
    data = as_matrix(x, "x")
    n = data.shape[0]
    k = check_positive_int(k, "k")
    if k > n:
        raise UserError(f"k={k} clusters need at least {k} points, got {n}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 0:
        raise UserError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not tol >= 0:
        raise UserError(f"tol must be >= 0, got {tol!r}")
    xw = prepare_rows(data, metric)
    rng = np.random.default_rng(seed)
    if not isinstance(init, str):
        given = as_matrix(init, "init centroids", d=data.shape[1], d_from="the data")
        if given.shape[0] != k:
            raise UserError(f"init centroids have {given.shape[0]} rows but k={k}")
        centroids = prepare_rows(given, metric).copy()
    elif init == "random":
        centroids = xw[np.sort(rng.choice(n, size=k, replace=False))].copy()
    else:
        centroids = _kmeanspp(xw, k, metric, rng, be)

    labels, cost = be.assign(xw, centroids, metric)
    inertia = float(cost.sum(dtype=np.float64))
    history = [inertia]
    converged, n_iter, reseeded = False, 0, 0
    bar = tqdm(total=int(max_iter), desc=f"kmeans k={k}", unit="iter", disable=not progress, leave=False)
    try:
        for _ in range(int(max_iter)):
            sums, counts = be.centroid_sums(xw, labels, k)
            new = centroids.astype(np.float64)
            filled = counts > 0
            if metric == "l2":
                new[filled] = sums[filled] / counts[filled, None]
            else:
                norms = np.linalg.norm(sums, axis=1)
                ok = filled & (norms > 0)  # a zero sum leaves every unit centroid equally good: keep it
                new[ok] = sums[ok] / norms[ok, None]
            empty = np.flatnonzero(~filled)
            if empty.size:
                far = np.lexsort((np.arange(n), -cost))[: empty.size]
                new[empty] = xw[far]
                reseeded += int(empty.size)
            centroids = new.astype(np.float32)
            new_labels, cost = be.assign(xw, centroids, metric)
            new_inertia = float(cost.sum(dtype=np.float64))
            n_iter += 1
            bar.update(1)
            bar.set_postfix(inertia=f"{new_inertia:.5g}", refresh=False)
            history.append(new_inertia)
            unchanged = empty.size == 0 and bool(np.array_equal(new_labels, labels))
            labels = new_labels
            if unchanged or inertia - new_inertia <= tol * inertia:
                converged = True
                inertia = new_inertia
                break
            inertia = new_inertia
    finally:
        bar.close()
    return KMeansResult(centroids, labels, inertia, n_iter, converged, history, reseeded)
