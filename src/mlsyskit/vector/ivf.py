"""IVF approximate search (faiss IndexIVFFlat's shape): cluster, probe the nearest lists, merge.

`train` runs KMeans on (a sample of) the data to get `nlist` coarse centroids; `add` files
each vector under its nearest centroid; `search` scans only the `nprobe` lists nearest to a
query, so it costs about nprobe/nlist of an exact search. With nprobe = nlist it is exact.

Storage is contiguous: the vectors sorted by (list, id), with `offsets[j]:offsets[j+1]` the
slice of list j, so a probe is a slice. Search is list-major: the queries that probe list j
are gathered and scored against it with one matrix product, as in faiss's batched GPU IVF.

Coarse quantizer per metric: l2 and manhattan use L2 KMeans centroids and L2 probing, cosine
spherical KMeans and cosine probing, dot L2 KMeans centroids probed by inner product (as
faiss does for inner-product IVF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlsyskit.errors import UserError
from mlsyskit.vector._validate import as_matrix, check_k, check_metric, check_positive_int
from mlsyskit.vector.backends import get_backend
from mlsyskit.vector.backends.base import DEFAULT_MEMORY_BUDGET, prepare_rows, row_sqnorms
from mlsyskit.vector.backends.selection import sort_pairs
from mlsyskit.vector.clustering import KMeansResult, kmeans
from mlsyskit.vector.index_io import read_index, write_index

_COARSE_METRIC = {"l2": "l2", "manhattan": "l2", "cosine": "cosine", "dot": "dot"}
_QUERY_BATCH = 8192  # queries searched together: bounds the (Q, nprobe, k) candidate buffers


class IVFIndex:
    """Inverted-file index over d-dimensional vectors with `nlist` lists.

    Usage: `index = IVFIndex(128, 1024); index.train(x); index.add(x);
    distances, ids = index.search(queries, k=10, nprobe=16)`. Distances follow
    `mlsyskit.vector.distances`; ids are those given to `add` (default 0, 1, 2, ... in
    insertion order). Where the probed lists hold fewer than k vectors, the remaining slots
    hold id -1 and distance inf. For cosine the stored vectors are unit-normalized.
    """

    kind = "IVFFlat"

    def __init__(self, d: int, nlist: int, metric: str = "l2", backend: str = "torch") -> None:
        self.d = check_positive_int(d, "d")
        self.nlist = check_positive_int(nlist, "nlist")
        self.metric = check_metric(metric)
        self.backend = get_backend(backend).name
        self.coarse_metric = _COARSE_METRIC[self.metric]
        self.centroids: np.ndarray | None = None
        self._vectors = np.empty((0, self.d), np.float32)
        self._ids = np.empty(0, np.int64)
        self._offsets = np.zeros(self.nlist + 1, np.int64)
        self._sqnorms: np.ndarray | None = None

    # --- building -------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    def list_sizes(self) -> np.ndarray:
        """Number of vectors in each list, (nlist,) int64."""
        return np.diff(self._offsets)

    def train(
        self,
        x: Any,
        max_iter: int = 20,
        seed: int = 0,
        init: str = "random",
        max_points_per_centroid: int = 256,
        progress: bool = False,
    ) -> KMeansResult:
        """Learn the coarse centroids with KMeans on x, or on a random sample of
        nlist * max_points_per_centroid rows of it (faiss's default rule). Returns the KMeans result.
        ``progress``: a bar over the KMeans iterations."""
        data = as_matrix(x, "training vectors", d=self.d, d_from="the index")
        if data.shape[0] < self.nlist:
            raise UserError(f"training needs at least nlist={self.nlist} vectors, got {data.shape[0]}")
        cap = self.nlist * check_positive_int(max_points_per_centroid, "max_points_per_centroid")
        if data.shape[0] > cap:
            rows = np.sort(np.random.default_rng(seed).choice(data.shape[0], cap, replace=False))
            data = data[rows]
        km_metric = "cosine" if self.metric == "cosine" else "l2"
        result = kmeans(data, self.nlist, km_metric, max_iter=max_iter, seed=seed, init=init,
                        backend=self.backend, progress=progress)
        self.centroids = result.centroids
        return result

    def _assign_lists(self, x: np.ndarray) -> np.ndarray:
        be = get_backend(self.backend)
        return be.assign(prepare_rows(x, self.coarse_metric), self.centroids, self.coarse_metric)[0]

    def add(self, x: Any, ids: Any = None) -> None:
        """Add vectors (n, d) with optional int64 ids >= 0 (default: ntotal, ntotal + 1, ...)."""
        if not self.is_trained:
            raise UserError("the index is not trained: call train(x) before add(x)")
        data = as_matrix(x, "vectors", d=self.d, d_from="the index")
        n = data.shape[0]
        if ids is None:
            new_ids = np.arange(self.ntotal, self.ntotal + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids)
            if new_ids.shape != (n,) or new_ids.dtype.kind not in "iu":
                raise UserError(f"ids must be {n} integers, one per vector; got shape {new_ids.shape} dtype {new_ids.dtype}")
            new_ids = new_ids.astype(np.int64)
            if n and new_ids.min() < 0:
                raise UserError("ids must be >= 0 (-1 marks an empty result slot)")
        if n == 0:
            return
        new_lists = self._assign_lists(data)
        new_rows = self._encode(prepare_rows(data, self.metric), new_lists)
        old_lists = np.repeat(np.arange(self.nlist), self.list_sizes())
        lists = np.concatenate([old_lists, new_lists])
        all_ids = np.concatenate([self._ids, new_ids])
        # Within a list, rows sorted by id: equal distances then come out by ascending id.
        order = np.lexsort((all_ids, lists))
        self._set_rows(np.concatenate([self._rows(), new_rows])[order])
        self._ids = all_ids[order]
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=self.nlist))])

    # What a list stores per vector: IVFFlat keeps the (prepared) vector itself.
    def _encode(self, prepared: np.ndarray, lists: np.ndarray) -> np.ndarray:
        return prepared

    def _rows(self) -> np.ndarray:
        return self._vectors

    def _set_rows(self, rows: np.ndarray) -> None:
        self._vectors = rows
        self._sqnorms = row_sqnorms(rows) if self.metric == "l2" else None

    # --- searching ------------------------------------------------------------------------
    def search(
        self, queries: Any, k: int, nprobe: int = 1, memory_budget: int = DEFAULT_MEMORY_BUDGET
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored vectors among the nprobe lists nearest to each query.

        Returns (distances, ids), float32 and int64 of shape (Q, k), sorted by distance then
        id. memory_budget: bytes for the temporaries of one batch of lists.
        """
        if not self.is_trained:
            raise UserError("the index is not trained: call train(x) and add(x) before search")
        q = as_matrix(queries, "queries", d=self.d, allow_vector=True, d_from="the index")
        k = check_k(k, self.ntotal, "vectors in the index")
        nprobe = check_positive_int(nprobe, "nprobe")
        if nprobe > self.nlist:
            raise UserError(f"nprobe={nprobe} exceeds nlist={self.nlist}; choose nprobe <= {self.nlist}")
        budget = max(4096, check_positive_int(memory_budget, "memory_budget"))
        dist = np.empty((q.shape[0], k), np.float32)
        ids = np.empty((q.shape[0], k), np.int64)
        for s in range(0, q.shape[0], _QUERY_BATCH):
            dist[s : s + _QUERY_BATCH], ids[s : s + _QUERY_BATCH] = self._search_batch(
                q[s : s + _QUERY_BATCH], k, nprobe, budget)
        return dist, ids

    def probe(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        """The nprobe nearest lists of each query, (Q, nprobe) int64, nearest first."""
        be = get_backend(self.backend)
        return be.knn(self.centroids, prepare_rows(q, self.coarse_metric), nprobe, self.coarse_metric)[1]

    def _search_batch(self, q: np.ndarray, k: int, nprobe: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        be = get_backend(self.backend)
        probes = self.probe(q, nprobe)
        scores, ids = be.scan_lists(prepare_rows(q, self.metric), self._vectors, self._sqnorms,
                                    self._offsets, self._ids, probes, k, self.metric, budget)
        q_sq = row_sqnorms(q) if self.metric == "l2" else None
        dist = be.finalize(scores, q_sq, self.metric).astype(np.float32, copy=False)
        dist[ids < 0] = np.inf
        return sort_pairs(dist, ids, k)

    # --- persistence ----------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"d": self.d, "nlist": self.nlist, "metric": self.metric, "ntotal": self.ntotal}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "offsets": self._offsets, "ids": self._ids,
                "vectors": self._vectors}

    def save(self, path: str | Path) -> None:
        """Write the index to `path` in the format of `mlsyskit.vector.index_io` (no pickle)."""
        if not self.is_trained:
            raise UserError("cannot save an untrained index: call train(x) first")
        write_index(path, self.kind, self._meta(), self._arrays())

    @classmethod
    def load(cls, path: str | Path, backend: str = "torch") -> IVFIndex:
        """Read an index written by `save`; UserError if the file is missing or corrupt."""
        kind, meta, arrays = read_index(path)
        if kind != cls.kind:
            raise UserError(f"index file {path} holds a {kind} index, not {cls.kind}")
        index = from_meta(cls, path, meta, backend)
        index._restore(path, arrays)
        return index

    def _restore(self, path: str | Path, arrays: dict[str, np.ndarray]) -> None:
        def need(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
            a = arrays.get(name)
            if a is None or a.dtype.str != dtype or a.shape != shape:
                got = None if a is None else (a.dtype.str, a.shape)
                raise UserError(f"index file {path} is corrupt: array {name} should be {dtype} {shape}, got {got}")
            return a

        n = int(arrays["ids"].shape[0]) if "ids" in arrays else -1
        self.centroids = need("centroids", "<f4", (self.nlist, self.d))
        self._offsets = need("offsets", "<i8", (self.nlist + 1,))
        self._ids = need("ids", "<i8", (n,))
        if self._offsets[0] != 0 or self._offsets[-1] != n or np.any(np.diff(self._offsets) < 0):
            raise UserError(f"index file {path} is corrupt: list offsets are inconsistent")
        self._load_codes(path, arrays, need, n)

    def _load_codes(self, path, arrays, need, n: int) -> None:
        self._vectors = need("vectors", "<f4", (n, self.d))
        self._sqnorms = row_sqnorms(self._vectors) if self.metric == "l2" else None


def from_meta(cls: type, path: str | Path, meta: dict[str, Any], backend: str) -> Any:
    """An empty index of class ``cls`` with the parameters a file header ``meta`` records."""
    try:
        extra = {key: meta[key] for key in getattr(cls, "_extra_meta", ())}
        return cls(int(meta["d"]), int(meta["nlist"]), str(meta["metric"]), backend=backend, **extra)
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"index file {path} is corrupt: bad parameters ({e})") from None
