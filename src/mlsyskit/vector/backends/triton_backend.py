"""The Triton back end: the GPU path (distance + top-k and KMeans assignment kernels).

Runs on a CUDA GPU when torch sees one; otherwise only under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before triton is first imported), which is slow and
meant for checking correctness on small inputs. The kernel leaves KB = min(k, BLOCK_N)
candidates per (query, base block); torch merges them into the final top-k by (score, index).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mlsyskit.errors import UserError
from mlsyskit.vector.backends.base import DEFAULT_MEMORY_BUDGET, Backend
from mlsyskit.vector.backends.torch_backend import (
    centroid_sums_t,
    exact_cost,
    finalize_scores,
    merge_after,
    sort_pairs_t,
)

BLOCK_Q, BLOCK_N, BLOCK_D = 16, 64, 32
BLOCK_M, BLOCK_K = 32, 64  # assignment: rows of x per program, centroids per step


def _load_kernels():
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not torch.cuda.is_available() and not interpret:
        raise UserError(
            "the triton back end needs a CUDA GPU; without one, set TRITON_INTERPRET=1 before "
            "starting Python to run its kernels in Triton's (slow) interpreter, or use --backend torch"
        )
    try:
        from mlsyskit.vector.backends import triton_kernels
    except ImportError as e:
        raise UserError(f"the triton back end needs the triton package ({e}); pip install triton, "
                        "or use the torch back end") from None
    return triton_kernels, ("cpu" if interpret else "cuda")


def _metric_code(kernels, metric: str) -> int:
    return {"l2": kernels.L2, "cosine": kernels.NEG_DOT, "dot": kernels.NEG_DOT,
            "manhattan": kernels.MANHATTAN}[metric]


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self.kernels, self.device = _load_kernels()

    def _t(self, a: np.ndarray) -> torch.Tensor:
        # A copy the tensor owns: the interpreter re-views kernel arguments' storages, which
        # fails on storages borrowed from numpy.
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, copy=True)

    def scan(self, q, b, k, metric, b_sqnorm=None, budget=DEFAULT_MEMORY_BUDGET):
        kern = self.kernels
        m, n, d = q.shape[0], b.shape[0], q.shape[1]
        k = min(k, n)
        kb = min(k, BLOCK_N)
        qt, bt = self._t(q), self._t(b)
        bsq = self._t(b_sqnorm) if b_sqnorm is not None else (bt * bt).sum(1) if metric == "l2" else bt[:, 0]
        # Base rows per launch: the (m, blocks * kb) candidate buffers stay within the budget.
        rows = max(BLOCK_N, budget // (12 * max(1, m) * kb) // BLOCK_N * BLOCK_N)
        best = None
        for n0 in range(0, n, rows):
            nb = min(rows, n - n0)
            grid = kern.grid2(m, nb, BLOCK_Q, BLOCK_N)
            out_s = torch.empty((m, grid[1] * kb), dtype=torch.float32, device=self.device)
            out_i = torch.empty((m, grid[1] * kb), dtype=torch.int64, device=self.device)
            kern.knn_block_topk_kernel[grid](
                qt, bt[n0:], bsq[n0:], out_s, out_i, m, nb, d,
                METRIC=_metric_code(kern, metric), KB=kb, BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
            )
            s, i = sort_pairs_t(out_s, out_i, k)  # (score, index) order: exact tie rule
            best = merge_after(best, (s, i + n0), k)
        return best[0].cpu().numpy(), best[1].cpu().numpy()

    def finalize(self, scores, q_sqnorm, metric):
        return finalize_scores(scores, q_sqnorm, metric)

    def assign(self, x, c, metric, budget=DEFAULT_MEMORY_BUDGET):
        kern = self.kernels
        xt, ct = self._t(x), self._t(c)
        n, d = x.shape
        csq = (ct * ct).sum(1) if metric == "l2" else ct[:, 0]
        labels = torch.empty(n, dtype=torch.int64, device=self.device)
        scores = torch.empty(n, dtype=torch.float32, device=self.device)
        kern.assign_kernel[(max(1, -(-n // BLOCK_M)),)](
            xt, ct, csq, labels, scores, n, c.shape[0], d,
            METRIC=_metric_code(kern, metric), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
        )
        cost = exact_cost(xt, ct.index_select(0, labels), metric)
        return labels.cpu().numpy(), cost.cpu().numpy()

    def centroid_sums(self, x, labels, k):
        return centroid_sums_t(self._t(x), self._t(labels), k)

    def pairwise(self, q, b, metric):
        kern = self.kernels
        qt, bt = self._t(q), self._t(b)
        nq, nb = q.shape[0], b.shape[0]
        bsq = (bt * bt).sum(1) if metric == "l2" else bt[:, 0]
        out = torch.empty((nq, nb), dtype=torch.float32, device=self.device)
        kern.score_tile_kernel[kern.grid2(nq, nb, BLOCK_Q, BLOCK_N)](
            qt, bt, bsq, out, nq, nb, q.shape[1],
            METRIC=_metric_code(kern, metric), BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )
        return finalize_scores(out.cpu().numpy(), (q * q).sum(1) if metric == "l2" else None, metric)
