"""The course's function signatures, so its test harness runs against this library.

`N` and `D` are the row count and dimension the harness passes alongside the arrays; they
are checked against the arrays' shapes. `A` is the (N, D) base, `X` one query (D,) or a
batch (Q, D): the result is then (K,) or (Q, K). Distances are L2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mlsyskit.errors import UserError
from mlsyskit.vector._validate import as_matrix, check_k
from mlsyskit.vector.clustering import kmeans
from mlsyskit.vector.exact_knn import knn
from mlsyskit.vector.ivf import IVFIndex


def _base(N: int, D: int, A: Any) -> np.ndarray:
    a = as_matrix(A, "A")
    if a.shape != (int(N), int(D)):
        raise UserError(f"A has shape {a.shape} but N={N}, D={D} were given")
    return a


def _queries(D: int, X: Any) -> tuple[np.ndarray, bool]:
    single = np.ndim(X) == 1
    return as_matrix(X, "X", d=int(D), allow_vector=True, d_from="A"), single


def our_knn(N: int, D: int, A: Any, X: Any, K: int) -> np.ndarray:
    """Indices of the K nearest rows of A to X (exact, L2), nearest first."""
    a = _base(N, D, A)
    q, single = _queries(D, X)
    idx = knn(a, q, K, "l2")[1]
    return idx[0] if single else idx


def our_kmeans(N: int, D: int, A: Any, K: int) -> np.ndarray:
    """A cluster id in [0, K) for each row of A (L2 KMeans, k-means++ seeding, seed 0)."""
    return kmeans(_base(N, D, A), K, "l2", seed=0).labels


def ann_parameters(n: int) -> tuple[int, int]:
    """(nlist, nprobe) used by `our_ann`: about sqrt(N) lists of >= 39 points, 1/8 of them probed."""
    nlist = max(1, min(round(math.sqrt(n)), n // 39))
    return nlist, max(1, min(nlist, math.ceil(nlist / 8)))


def our_ann(N: int, D: int, A: Any, X: Any, K: int, nlist: int | None = None, nprobe: int | None = None) -> np.ndarray:
    """Indices of (approximately) the K nearest rows of A to X: an IVF index over A, probing
    the nprobe nearest of nlist KMeans clusters (defaults: `ann_parameters(N)`)."""
    a = _base(N, D, A)
    q, single = _queries(D, X)
    check_k(K, a.shape[0])
    auto_nlist, auto_nprobe = ann_parameters(a.shape[0])
    nlist = nlist or auto_nlist
    nprobe = nprobe or min(nlist, auto_nprobe)
    index = IVFIndex(a.shape[1], nlist, "l2")
    index.train(a)
    index.add(a)
    idx = index.search(q, K, nprobe)[1]
    return idx[0] if single else idx


def recall_rate(list1: Any, list2: Any) -> float:
    """Fraction of the entries of list1 (the exact answer) that appear in list2.

    For 2-D inputs (one row per query) the per-row recalls are averaged.
    """
    a, b = np.asarray(list1), np.asarray(list2)
    if a.ndim == 1 and b.ndim == 1:
        return len(set(a.tolist()) & set(b.tolist())) / len(a) if len(a) else 1.0
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise UserError(f"recall_rate needs two lists or two arrays with one row per query, got shapes {a.shape} and {b.shape}")
    return float(np.mean([recall_rate(x, y) for x, y in zip(a, b, strict=True)])) if len(a) else 1.0
