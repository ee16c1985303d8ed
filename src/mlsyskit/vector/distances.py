"""Distance functions, for one pair of vectors and batched (queries x base).

Every metric is a distance (smaller is nearer), so one top-k rule serves them all:

- l2: Euclidean distance sqrt(sum (x - y)^2) (not squared)
- cosine: 1 - x.y / (|x| |y|), in [0, 2]; a zero vector has cosine distance 1 to everything
  (its similarity is defined as 0), including to another zero vector
- dot: -x.y, the negated inner product (the largest inner product is the nearest)
- manhattan: sum |x - y|
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlsyskit.errors import UserError
from mlsyskit.vector._validate import as_matrix, check_metric, to_numpy
from mlsyskit.vector.backends import get_backend
from mlsyskit.vector.backends.base import prepare_rows


def _vector(v: Any, name: str) -> np.ndarray:
    arr = to_numpy(v, name)
    if arr.ndim != 1 or arr.size == 0:
        raise UserError(f"{name} must be a non-empty vector of shape (d,), got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise UserError(f"{name} contains NaN or infinite values")
    return arr


def distance(x: Any, y: Any, metric: str = "l2") -> float:
    """The distance between two vectors of equal length, from the formula, in float64."""
    metric = check_metric(metric)
    a, b = _vector(x, "x"), _vector(y, "y")
    if a.shape != b.shape:
        raise UserError(f"x and y must be two vectors of equal length, got shapes {a.shape} and {b.shape}")
    if metric == "l2":
        return float(np.sqrt(np.sum((a - b) ** 2)))
    if metric == "manhattan":
        return float(np.sum(np.abs(a - b)))
    if metric == "dot":
        return float(-(a @ b))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0  # the zero-vector convention (see the module docstring)
    return float(min(2.0, max(0.0, 1.0 - (a @ b) / (na * nb))))


def pairwise_distances(queries: Any, base: Any, metric: str = "l2", backend: str = "torch") -> np.ndarray:
    """All distances between queries (Q, D) and base (N, D): a float32 (Q, N) matrix.

    This materializes Q x N floats; for nearest neighbours use `knn`, which is chunked.
    """
    metric = check_metric(metric)
    be = get_backend(backend)
    b = as_matrix(base, "base")
    q = as_matrix(queries, "queries", d=b.shape[1], allow_vector=True)
    return be.pairwise(prepare_rows(q, metric), prepare_rows(b, metric), metric)
