"""Triton kernels: fused distance + per-block top-k, the KMeans assignment step, distance tiles.

Importing this module imports triton; `triton_backend` does it lazily. Scores (smaller is
nearer) for the METRIC constexpr: 0 = l2 (|b|^2 - 2 q.b), 1 = negated inner product (dot, and
cosine on unit rows), 2 = manhattan (sum |q - b|). Matrix products use IEEE fp32 (no TF32),
so results match the CPU back ends to float32 rounding. On a machine without a GPU they run
under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations

import triton
import triton.language as tl

L2, NEG_DOT, MANHATTAN = 0, 1, 2


@triton.jit
def _score_tile(q_ptr, b_ptr, bsq_ptr, rq, rn, nq, nb, d, METRIC: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of query rows rq against base rows rn, (BLOCK_Q, BLOCK_N); +inf past nb."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + rq[:, None] * d + rd[None, :], mask=(rq[:, None] < nq) & (rd[None, :] < d), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * d + rd[None, :], mask=(rn[:, None] < nb) & (rd[None, :] < d), other=0.0)
        if METRIC == 2:
            acc += tl.sum(tl.abs(q[:, None, :] - b[None, :, :]), axis=2)
        else:
            acc += tl.dot(q, tl.trans(b), input_precision="ieee")
    if METRIC == 0:
        bsq = tl.load(bsq_ptr + rn, mask=rn < nb, other=0.0)
        acc = bsq[None, :] - 2.0 * acc
    elif METRIC == 1:
        acc = -acc
    return tl.where(rn[None, :] < nb, acc, float("inf"))


@triton.jit
def knn_block_topk_kernel(q_ptr, b_ptr, bsq_ptr, out_s_ptr, out_i_ptr, nq, nb, d,
                          METRIC: tl.constexpr, KB: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (query block, base block): the KB smallest scores of each query row in the block.

    Writes out[q, block * KB + i] for i < KB in (score, index) order: each round takes the
    row minimum (argmin breaks ties to the left, i.e. the lower index) and masks it out.
    Slots past the end of the base hold (+inf, -1).
    """
    pid_q = tl.program_id(0)
    pid_n = tl.program_id(1)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + cols
    s = _score_tile(q_ptr, b_ptr, bsq_ptr, rq, rn, nq, nb, d, METRIC, BLOCK_D, BLOCK_Q, BLOCK_N)
    width = tl.num_programs(1) * KB
    for i in range(KB):
        best = tl.min(s, axis=1)
        arg = tl.argmin(s, axis=1, tie_break_left=True)
        idx = tl.where(best < float("inf"), pid_n * BLOCK_N + arg, -1).to(tl.int64)
        out = rq * width + pid_n * KB + i
        tl.store(out_s_ptr + out, best, mask=rq < nq)
        tl.store(out_i_ptr + out, idx, mask=rq < nq)
        s = tl.where(cols[None, :] == arg[:, None], float("inf"), s)


@triton.jit
def assign_kernel(x_ptr, c_ptr, csq_ptr, out_label_ptr, out_score_ptr, n, kc, d,
                  METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """KMeans assignment: for each row of x the nearest centroid (lowest index on ties)."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    label = tl.zeros((BLOCK_M,), tl.int64)
    for k0 in range(0, kc, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        s = _score_tile(x_ptr, c_ptr, csq_ptr, rm, rk, n, kc, d, METRIC, BLOCK_D, BLOCK_M, BLOCK_K)
        m = tl.min(s, axis=1)
        a = tl.argmin(s, axis=1, tie_break_left=True).to(tl.int64) + k0
        better = m < best  # strict: an earlier block (lower index) keeps ties
        label = tl.where(better, a, label)
        best = tl.where(better, m, best)
    tl.store(out_label_ptr + rm, label, mask=rm < n)
    tl.store(out_score_ptr + rm, best, mask=rm < n)


@triton.jit
def score_tile_kernel(q_ptr, b_ptr, bsq_ptr, out_ptr, nq, nb, d, METRIC: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The full score matrix, one (BLOCK_Q, BLOCK_N) tile per program."""
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = _score_tile(q_ptr, b_ptr, bsq_ptr, rq, rn, nq, nb, d, METRIC, BLOCK_D, BLOCK_Q, BLOCK_N)
    tl.store(out_ptr + rq[:, None] * nb + rn[None, :], s, mask=(rq[:, None] < nq) & (rn[None, :] < nb))


def grid2(nq: int, nb: int, block_q: int, block_n: int) -> tuple[int, int]:
    return triton.cdiv(nq, block_q), triton.cdiv(nb, block_n)
