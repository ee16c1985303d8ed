"""Exact k-nearest-neighbour search, chunked over the base and the queries.

Memory stays bounded whatever N is: besides the inputs, only the score blocks being worked
on (about `memory_budget` bytes in all, shared by the worker threads), half a budget for a
prepared base chunk (|b|^2, or a unit-normalized copy for cosine) and the (Q, k) candidate
lists are alive at a time. 4,000,000 x 128 float32 (1.9 GiB) searched 1,000 queries at a
measured peak resident size of 2.3 GiB (benchmarks/results/vector_search.json).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlsyskit.vector._validate import as_matrix, check_k, check_metric, check_positive_int
from mlsyskit.vector.backends import get_backend
from mlsyskit.vector.backends.base import DEFAULT_MEMORY_BUDGET


def knn(
    base: Any,
    queries: Any,
    k: int,
    metric: str = "l2",
    backend: str = "torch",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of `base` (N, D) to each row of `queries` (Q, D), exactly.

    Returns (distances, indices): float32 and int64 arrays of shape (Q, k), each row sorted
    by distance, equal distances by ascending index (a 1-D query counts as Q = 1). Metrics
    and their conventions are those of `mlsyskit.vector.distances`. Raises UserError on bad
    input: wrong dtype or shape, k < 1 or k > N, unknown metric or backend.
    """
    metric = check_metric(metric)
    be = get_backend(backend)
    b = as_matrix(base, "base")
    q = as_matrix(queries, "queries", d=b.shape[1], allow_vector=True)
    k = check_k(k, b.shape[0])
    if q.shape[0] == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return be.knn(b, q, k, metric, budget=max(4096, check_positive_int(memory_budget, "memory_budget")))
