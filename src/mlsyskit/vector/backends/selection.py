"""Top-k selection with a defined tie rule, in numpy: equal scores are ordered by ascending index.

`np.argpartition` and `torch.topk` pick an arbitrary subset when several entries tie with the
k-th smallest; both selectors below detect that case (the k-th and (k+1)-th values are equal)
and resolve it exactly, so results do not depend on the selection algorithm or the chunking.
"""

from __future__ import annotations

import numpy as np


def sort_pairs(vals: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest (val, id) pairs of each row, ordered by val then id."""
    order = np.lexsort((ids, vals), axis=-1)[:, :k]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(ids, order, 1)


def merge_pairs(
    a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-row candidate lists into the k best (val, id) pairs."""
    if a is None:
        return b
    return sort_pairs(np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1), k)


def select_block_np(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest scores of each row with their column positions, ties by position."""
    m, n = scores.shape
    if k >= n:
        pos = np.argsort(scores, axis=1, kind="stable")
        return np.take_along_axis(scores, pos, 1), pos.astype(np.int64)
    part = np.argpartition(scores, k, axis=1)
    pos = part[:, :k]
    vals = np.take_along_axis(scores, pos, 1)
    kth = vals.max(axis=1)
    nxt = np.take_along_axis(scores, part[:, k : k + 1], 1)[:, 0]
    tie = kth == nxt  # entries equal to the k-th value were left out: choose the lowest positions
    if tie.any():
        rows = np.flatnonzero(tie)
        sub = scores[rows]
        v = kth[rows, None]
        lt, eq = sub < v, sub == v
        need = k - lt.sum(1, keepdims=True)
        keep = lt | (eq & (np.cumsum(eq, 1) <= need))
        fixed = np.nonzero(keep)[1].reshape(len(rows), k)
        pos = pos.copy()
        pos[rows] = fixed
        vals[rows] = np.take_along_axis(sub, fixed, 1)
    return sort_pairs(vals, pos.astype(np.int64), k)
