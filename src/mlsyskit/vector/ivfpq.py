"""IVF with product-quantized residuals (faiss IndexIVFPQ's shape): compressed inverted lists.

A vector x filed under coarse centroid c is stored as m codes of nbits bits (one byte each
here): its residual r = x - c is cut into m sub-vectors of d/m dimensions, and each is
replaced by the index of its nearest codeword in that sub-space's codebook (2^nbits
codewords, learned by KMeans on training residuals). At d = 128, m = 16 that is 16 bytes
instead of 512.

Search uses asymmetric distance computation (ADC): for a query q and a probed list c, a table
T[s, j] = |(q - c)_s - codebook[s, j]|^2 is built per sub-space, and the squared distance to a
stored vector is approximated by the sum over s of T[s, code_s]. Distances are approximate;
recall is below IVFFlat's at the same nprobe, traded for memory. Metrics: l2 (Euclidean
distance from the approximate squared distance) and cosine (on unit vectors, where the cosine
distance is half the squared L2 distance). The list scan runs on torch whatever the back end;
the back end serves the KMeans steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mlsyskit.errors import UserError
from mlsyskit.vector._validate import as_matrix, check_positive_int
from mlsyskit.vector.backends import get_backend
from mlsyskit.vector.backends.base import DEFAULT_MEMORY_BUDGET, prepare_rows
from mlsyskit.vector.backends.selection import sort_pairs
from mlsyskit.vector.clustering import KMeansResult, kmeans
from mlsyskit.vector.ivf import IVFIndex

PQ_TRAIN_POINTS_PER_CODEWORD = 256  # faiss's default sample cap for the codebooks


class IVFPQIndex(IVFIndex):
    """IVF index whose lists hold PQ codes of the residuals: `IVFPQIndex(d, nlist, m=16)`.

    Same use as IVFIndex (train, add, search, save, load); d must be a multiple of m.
    """

    kind = "IVFPQ"
    _extra_meta = ("m", "nbits")

    def __init__(self, d: int, nlist: int, metric: str = "l2", backend: str = "torch", m: int = 8,
                 nbits: int = 8) -> None:
        super().__init__(d, nlist, metric, backend)
        if self.metric not in ("l2", "cosine"):
            raise UserError(f"IVFPQ supports the l2 and cosine metrics, not {self.metric}")
        self.m = check_positive_int(m, "m")
        if self.d % self.m:
            raise UserError(f"d={self.d} must be a multiple of m={self.m} (the number of sub-vectors)")
        self.nbits = check_positive_int(nbits, "nbits")
        if self.nbits > 8:
            raise UserError(f"nbits must be between 1 and 8 (one byte per code), got {self.nbits}")
        self.ksub, self.dsub = 1 << self.nbits, self.d // self.m
        self.codebooks: np.ndarray | None = None  # (m, ksub, dsub) float32
        self._codes = np.empty((0, self.m), np.uint8)

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None and self.codebooks is not None

    def train(self, x: Any, max_iter: int = 20, seed: int = 0, init: str = "random",
              max_points_per_centroid: int = 256, pq_max_iter: int = 20,
              progress: bool = False) -> KMeansResult:
        """Train the coarse centroids (as IVFIndex.train), then one KMeans codebook per
        sub-space on the residuals of a sample of x. Returns the coarse KMeans result."""
        result = super().train(x, max_iter=max_iter, seed=seed, init=init,
                               max_points_per_centroid=max_points_per_centroid, progress=progress)
        data = as_matrix(x, "training vectors", d=self.d, d_from="the index")
        cap = PQ_TRAIN_POINTS_PER_CODEWORD * self.ksub
        if data.shape[0] > cap:
            data = data[np.sort(np.random.default_rng(seed + 1).choice(data.shape[0], cap, replace=False))]
        if data.shape[0] < self.ksub:
            raise UserError(f"training the product quantizer needs at least 2^nbits={self.ksub} vectors, got {data.shape[0]}")
        resid = self._residuals(prepare_rows(data, self.metric), self._assign_lists(data))
        books = []
        for s in tqdm(range(self.m), desc="PQ codebooks", unit="sub-space", disable=not progress, leave=False):
            sub = resid[:, s * self.dsub : (s + 1) * self.dsub]
            books.append(kmeans(sub, self.ksub, "l2", max_iter=pq_max_iter, seed=seed + 1 + s,
                                init="random", backend=self.backend).centroids)
        self.codebooks = np.stack(books).astype(np.float32)
        return result

    def _residuals(self, prepared: np.ndarray, lists: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(prepared - self.centroids[lists], dtype=np.float32)

    def _encode(self, prepared: np.ndarray, lists: np.ndarray) -> np.ndarray:
        be = get_backend(self.backend)
        resid = self._residuals(prepared, lists)
        codes = np.empty((len(resid), self.m), np.uint8)
        for s in range(self.m):
            sub = np.ascontiguousarray(resid[:, s * self.dsub : (s + 1) * self.dsub])
            codes[:, s] = be.assign(sub, self.codebooks[s], "l2")[0]
        return codes

    def _rows(self) -> np.ndarray:
        return self._codes

    def _set_rows(self, rows: np.ndarray) -> None:
        self._codes = rows

    def _search_batch(self, q: np.ndarray, k: int, nprobe: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        probes = self.probe(q, nprobe)
        scores, ids = _adc_scan(prepare_rows(q, self.metric), self.centroids, self.codebooks, self._codes,
                                self._offsets, self._ids, probes, k, budget)
        if self.metric == "l2":
            dist = np.sqrt(np.maximum(scores, 0.0))
        else:  # unit vectors: 1 - cos = |a - b|^2 / 2
            dist = np.clip(scores / 2.0, 0.0, 2.0)
        dist = dist.astype(np.float32, copy=False)
        dist[ids < 0] = np.inf
        return sort_pairs(dist, ids, k)

    # --- persistence ----------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "m": self.m, "nbits": self.nbits}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "offsets": self._offsets, "ids": self._ids,
                "codes": self._codes, "codebooks": self.codebooks}

    def save(self, path: str | Path) -> None:
        """Write the index to `path` in the format of `mlsyskit.vector.index_io` (no pickle)."""
        if not self.is_trained:
            raise UserError("cannot save an untrained index: call train(x) first")
        super().save(path)

    def _load_codes(self, path, arrays, need, n: int) -> None:
        self._codes = need("codes", "|u1", (n, self.m))
        self.codebooks = need("codebooks", "<f4", (self.m, self.ksub, self.dsub))


def _adc_scan(qp, centroids, books, codes, offsets, ids, probes, k, budget=DEFAULT_MEMORY_BUDGET):
    """List-major ADC: per probed list, one lookup table per query and a gather-sum per code."""
    import torch

    from mlsyskit.vector.backends.torch_backend import (
        run_tasks,
        select_block_t,
        single_threaded_ops,
        topk_pairs_t,
    )

    nq, nprobe = probes.shape
    m, ksub, dsub = books.shape
    qt, ct, it = torch.from_numpy(qp), torch.from_numpy(centroids), torch.from_numpy(ids)
    bt = torch.from_numpy(books).transpose(1, 2)  # (m, dsub, ksub)
    bsq = (bt * bt).sum(1)  # (m, ksub)
    shift = torch.arange(m) * ksub
    cand_s = torch.full((nq * nprobe, k), float("inf"))
    cand_i = torch.full((nq * nprobe, k), -1, dtype=torch.int64)
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    lists, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    keep = offsets[lists + 1] > offsets[lists]
    lists, starts, counts = lists[keep], starts[keep], counts[keep]

    def scan(chosen: np.ndarray) -> None:
        for b in chosen:
            pairs = order[starts[b] : starts[b] + counts[b]]
            lo, hi = offsets[lists[b]], offsets[lists[b] + 1]
            target = torch.from_numpy(pairs)
            resid = qt.index_select(0, torch.from_numpy(pairs // nprobe)) - ct[lists[b]]
            rs = resid.view(len(pairs), m, dsub).transpose(0, 1)  # (m, g, dsub)
            # T[g, s, j] = |r_s|^2 - 2 r_s . c_sj + |c_sj|^2, one batched product over s.
            table = (rs * rs).sum(2, keepdim=True) - 2 * torch.bmm(rs, bt) + bsq[:, None, :]
            table = table.transpose(0, 1).reshape(len(pairs), m * ksub)
            rows = max(1, budget // max(1, 4 * len(pairs) * m))  # the (g, rows, m) gather
            parts_s, parts_i = [], []
            for r0 in range(lo, hi, rows):
                r1 = min(hi, r0 + rows)
                idx = (torch.from_numpy(codes[r0:r1]).long() + shift).view(-1)
                scores = table[:, idx].view(len(pairs), r1 - r0, m).sum(2)
                v, p = select_block_t(scores, min(k, r1 - r0), ordered=False)
                parts_s.append(v)
                parts_i.append(it[r0:r1][p])
            v, i = topk_pairs_t(torch.cat(parts_s, 1), torch.cat(parts_i, 1), min(k, hi - lo))
            cand_s[target, : v.shape[1]] = v
            cand_i[target, : v.shape[1]] = i

    workers = max(1, torch.get_num_threads())
    if len(lists):
        run_tasks(scan, np.array_split(np.arange(len(lists)), min(len(lists), 4 * workers)))
    with single_threaded_ops():
        best = topk_pairs_t(cand_s.view(nq, nprobe * k), cand_i.view(nq, nprobe * k), k)
    return best[0].numpy(), best[1].numpy()
