"""What a back end computes, and the back-end-independent machinery around it.

A back end implements these kernels on float32 numpy arrays (conversions to torch are
zero-copy), plus `pairwise` (the full distance matrix):

- `scan(q, b, k, metric, b_sqnorm)`: the k best rows of `b` for each row of `q` by the back
  end's *score* (smaller is nearer), sorted by (score, position), chunked to a memory budget.
  Inputs are prepared: unit rows for cosine (see `prepare_rows`); `b_sqnorm` = |b|^2 for l2.
- `finalize(scores, q_sqnorm, metric)`: scores -> distances (a monotone map per query).
- `assign(x, c, metric)`: the nearest row of `c` for each row of `x` (first index on ties),
  with the exact cost (squared L2 for l2, the distance otherwise): the KMeans step.
- `centroid_sums(x, labels, k)`: per-cluster sums (float64) and counts.

`knn` (chunked exact search) and `scan_lists` (the IVF probe scan) are built on `scan` here,
once for every back end; the torch back end replaces `scan_lists` with a batched version.
"""

from __future__ import annotations

import numpy as np

from mlsyskit.vector.backends.selection import merge_pairs, sort_pairs

MiB = 1 << 20
DEFAULT_MEMORY_BUDGET = 64 * MiB  # bytes of temporaries in flight (shared by worker threads)


def row_sqnorms(x: np.ndarray) -> np.ndarray:
    """|x_i|^2 for each row, float32."""
    return np.einsum("ij,ij->i", x, x)


def prepare_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """Rows as the kernels expect them: unit length for cosine (zero rows stay zero)."""
    if metric != "cosine":
        return x
    norms = np.sqrt(row_sqnorms(x))
    # A zero vector has no direction: it stays zero, so its cosine similarity is 0 to everything
    # and its cosine distance is 1 (the documented convention).
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return x * inv[:, None]


class Backend:
    """Base class; subclasses implement scan, finalize, assign, centroid_sums, pairwise."""

    name = "base"

    def scan(self, q, b, k, metric, b_sqnorm=None, budget=DEFAULT_MEMORY_BUDGET):
        raise NotImplementedError

    def finalize(self, scores: np.ndarray, q_sqnorm: np.ndarray | None, metric: str) -> np.ndarray:
        raise NotImplementedError

    def assign(self, x, c, metric, budget=DEFAULT_MEMORY_BUDGET):
        raise NotImplementedError

    def centroid_sums(self, x: np.ndarray, labels: np.ndarray, k: int):
        raise NotImplementedError

    def pairwise(self, q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
        """The full (Q, N) distance matrix."""
        raise NotImplementedError

    def scan_lists(
        self, qp: np.ndarray, vectors: np.ndarray, sqnorms: np.ndarray | None, offsets: np.ndarray,
        ids: np.ndarray, probes: np.ndarray, k: int, metric: str, budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF scan: the k best (score, id) of each query over its probed lists, list-major.

        qp: prepared queries (Q, d); list j is rows offsets[j]:offsets[j+1] of `vectors` (with
        `ids`, sorted by id within the list); probes: (Q, nprobe) list numbers. Missing
        results are (inf, -1).
        """
        nq, nprobe = probes.shape
        cand_s = np.full((nq, nprobe, k), np.inf, np.float32)
        cand_i = np.full((nq, nprobe, k), -1, np.int64)
        # Group the (query, probe slot) pairs by list: each list is scanned once, for all the
        # queries that probe it, in one matrix product.
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(offsets)))
        qrow, slot = np.divmod(order, nprobe)
        lists = [j for j in np.flatnonzero(np.diff(bounds)) if offsets[j + 1] > offsets[j]]

        for j in lists:
            lo, hi = offsets[j], offsets[j + 1]
            g = slice(bounds[j], bounds[j + 1])
            rows = qrow[g]
            sq = None if sqnorms is None else sqnorms[lo:hi]
            s, p = self.scan(qp[rows], vectors[lo:hi], k, metric, sq, budget)
            cand_s[rows, slot[g], : s.shape[1]] = s
            cand_i[rows, slot[g], : s.shape[1]] = ids[lo + p]
        return sort_pairs(cand_s.reshape(nq, -1), cand_i.reshape(nq, -1), k)

    def base_chunk_rows(self, n: int, d: int, budget: int) -> int:
        """Rows of the base prepared at once by `knn` (a normalized copy for cosine)."""
        return max(1, min(n, budget // 2 // (4 * d)))

    def knn(
        self, base: np.ndarray, queries: np.ndarray, k: int, metric: str,
        budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest rows of `base` for each query: (distances, indices), (Q, k) each."""
        n, d = base.shape
        qp = prepare_rows(queries, metric)
        best = None
        step = self.base_chunk_rows(n, d, budget)
        for n0 in range(0, n, step):
            chunk = prepare_rows(base[n0 : n0 + step], metric)
            sq = row_sqnorms(chunk) if metric == "l2" else None
            s, p = self.scan(qp, chunk, k, metric, sq, budget)
            best = merge_pairs(best, (s, p + n0), k)
        scores, idx = best
        q_sq = row_sqnorms(queries) if metric == "l2" else None
        dist = self.finalize(scores, q_sq, metric)
        # Rounding in finalize (e.g. the sqrt) can make distinct scores equal: re-apply the tie rule.
        return sort_pairs(dist.astype(np.float32, copy=False), idx, k)
