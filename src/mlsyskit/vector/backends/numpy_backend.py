"""The numpy back end: the baseline a student writes, with each distance taken from its formula.

L2 and Manhattan broadcast the difference q - b (a (q, n, d) temporary, chunked to the memory
budget) instead of using the |q|^2 - 2 q.b + |b|^2 expansion; cosine and dot take one query
at a time, a matrix-vector product each (their formula, as in the course's single-query
functions). Selection is `np.argpartition`. This is the reference the fast back ends are
tested and benchmarked against.
"""

from __future__ import annotations

import numpy as np

from mlsyskit.vector.backends.base import DEFAULT_MEMORY_BUDGET, Backend
from mlsyskit.vector.backends.selection import merge_pairs, select_block_np

# The broadcast temporary is the big one; keep it well inside the budget so numpy's own
# temporaries (square, abs) fit beside it.
_TEMP_FRACTION = 4


def _direct(q: np.ndarray, b: np.ndarray, metric: str, squared: bool = False) -> np.ndarray:
    """Distances from the formulas; q and b prepared (unit rows for cosine).

    squared: for l2, return the squared distance (the KMeans cost).
    """
    if metric == "l2":
        diff = q[:, None, :] - b[None, :, :]
        sq = np.sum(diff * diff, axis=2)
        return sq if squared else np.sqrt(sq)
    if metric == "manhattan":
        return np.sum(np.abs(q[:, None, :] - b[None, :, :]), axis=2)
    sim = q @ b.T
    if metric == "cosine":
        return np.clip(1.0 - sim, 0.0, 2.0)
    return -sim  # dot: the distance is the negated inner product, so larger x.y is nearer


def _chunks(m: int, n: int, d: int, metric: str, budget: int) -> tuple[int, int]:
    if metric in ("cosine", "dot"):  # one query at a time: a matrix-vector product each
        return 1, max(1, min(n, budget // _TEMP_FRACTION // 4))
    cells = max(1, budget // _TEMP_FRACTION // (4 * d))  # the (q, n, d) broadcast temporary
    qc = max(1, min(m, cells // max(1, min(n, 4096))))
    nc = max(1, min(n, cells // qc))
    return qc, nc


class NumpyBackend(Backend):
    name = "numpy"

    def scan(self, q, b, k, metric, b_sqnorm=None, budget=DEFAULT_MEMORY_BUDGET):
        m, n = q.shape[0], b.shape[0]
        k = min(k, n)
        qc, nc = _chunks(m, n, q.shape[1], metric, budget)
        out_s = np.empty((m, k), np.float32)
        out_i = np.empty((m, k), np.int64)
        for q0 in range(0, m, qc):
            best = None
            for n0 in range(0, n, nc):
                s, p = select_block_np(_direct(q[q0 : q0 + qc], b[n0 : n0 + nc], metric), k)
                best = merge_pairs(best, (s, p + n0), k)
            out_s[q0 : q0 + qc], out_i[q0 : q0 + qc] = best
        return out_s, out_i

    def finalize(self, scores, q_sqnorm, metric):
        return scores  # scores are already the distances

    def assign(self, x, c, metric, budget=DEFAULT_MEMORY_BUDGET):
        n = x.shape[0]
        labels = np.empty(n, np.int64)
        cost = np.empty(n, np.float32)
        qc, _ = _chunks(n, c.shape[0], x.shape[1], metric, budget)
        for s in range(0, n, qc):
            dist = _direct(x[s : s + qc], c, metric, squared=True)
            lab = np.argmin(dist, axis=1)  # first index on ties
            labels[s : s + qc] = lab
            cost[s : s + qc] = dist[np.arange(len(lab)), lab]
        return labels, cost

    def centroid_sums(self, x, labels, k):
        sums = np.zeros((k, x.shape[1]), np.float64)
        np.add.at(sums, labels, x)
        return sums, np.bincount(labels, minlength=k)

    def pairwise(self, q, b, metric):
        out = np.empty((q.shape[0], b.shape[0]), np.float32)
        qc, _ = _chunks(q.shape[0], b.shape[0], q.shape[1], metric, DEFAULT_MEMORY_BUDGET)
        nc = max(1, DEFAULT_MEMORY_BUDGET // _TEMP_FRACTION // (4 * q.shape[1] * qc))
        for q0 in range(0, q.shape[0], qc):
            for n0 in range(0, b.shape[0], nc):
                out[q0 : q0 + qc, n0 : n0 + nc] = _direct(q[q0 : q0 + qc], b[n0 : n0 + nc], metric)
        return out
