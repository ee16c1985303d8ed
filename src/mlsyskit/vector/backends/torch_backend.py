"""The torch back end (the default): BLAS matrix products for L2/cosine/dot, `torch.topk` per chunk.

Scores, smaller is nearer, per (query, base row):

- l2: |b|^2 - 2 q.b (one `addmm`; the per-query |q|^2 is added back in `finalize`, then sqrt)
- cosine: -q.b on unit rows (`finalize` adds 1); dot: -q.b
- manhattan: sum |q - b| (`torch.cdist(p=1)`; it has no matrix-product form)

Many queries go through one GEMM per chunk; the chunk's score matrix stays within the memory
budget, and each chunk's top-k is merged into the running best.

Parallelism: independent chunks run as tasks on a pool of torch.get_num_threads() Python
threads, each torch op on one thread (torch releases the GIL inside ops). OpenMP-parallel
ops instead wait at a barrier for their slowest thread, which stalls for a whole scheduler
slice whenever another process holds a core; independent tasks keep every free core busy.
The torch thread setting is set to 1 for the duration of a call and then restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mlsyskit.vector.backends.base import DEFAULT_MEMORY_BUDGET, Backend

SMALL_LIST_FLOATS = 1 << 14  # IVF lists up to this many floats are batched (copy < op overhead)
QUERY_CHUNK = 256  # queries per GEMM: enough rows for BLAS efficiency, small enough to stay in cache
MIN_BASE_CHUNK = 256


def sort_pairs_t(vals: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (val, id) pairs per row, ordered by val then id."""
    ids, perm = torch.sort(ids, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, stable=True)
    return vals[:, :k], ids.gather(1, perm[:, :k])


def select_block_t(scores: torch.Tensor, k: int, ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest scores per row and their column positions, ties by position.

    ordered=False: the same set, in no particular order (for candidates merged later).
    """
    m, n = scores.shape
    if k >= n:
        if not ordered:
            return scores, torch.arange(n).expand(m, n)
        vals, pos = torch.sort(scores, dim=1, stable=True)
        return vals, pos
    vals, pos = torch.topk(scores, k + 1, dim=1, largest=False, sorted=True)
    tie = vals[:, k - 1] == vals[:, k]
    vals, pos = vals[:, :k].contiguous(), pos[:, :k].contiguous()
    if bool(tie.any()):
        # topk chose an arbitrary subset of the entries tied with the k-th value: keep the
        # lowest positions instead, exactly, for the (rare) rows concerned.
        rows = tie.nonzero().squeeze(1)
        sub = scores.index_select(0, rows)
        v = vals.index_select(0, rows)[:, k - 1 : k]
        lt, eq = sub < v, sub == v
        need = k - lt.sum(1, keepdim=True)
        keep = lt | (eq & (eq.cumsum(1) <= need))
        fixed = keep.nonzero()[:, 1].view(len(rows), k)
        vals[rows] = sub.gather(1, fixed)
        pos[rows] = fixed
    return sort_pairs_t(vals, pos, k) if ordered else (vals, pos)


def merge_after(
    best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge sorted candidates where every id in `new` exceeds every id in `best`."""
    if best is None:
        return new
    vals = torch.cat([best[0], new[0]], 1)
    ids = torch.cat([best[1], new[1]], 1)
    # A stable sort keeps `best` first among equal values, i.e. the lower ids first.
    vals, perm = torch.sort(vals, dim=1, stable=True)
    return vals[:, :k], ids.gather(1, perm[:, :k])


_POOLS: dict[int, ThreadPoolExecutor] = {}


@contextmanager
def single_threaded_ops() -> Iterator[int]:
    """Torch ops on one thread inside; yields the thread count that was set before."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield n
    finally:
        if n > 1:
            torch.set_num_threads(n)


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
    """[fn(t) for t in tasks], spread over torch.get_num_threads() threads, ops single-threaded.

    Inside a task torch.get_num_threads() is 1, so nested calls run serially.
    """
    with single_threaded_ops() as workers:
        if workers == 1 or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mlsyskit-vector")
        return list(_POOLS[workers].map(fn, tasks))


def topk_pairs_t(vals: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (val, id) pairs per row, ordered by val then id; ids in any order."""
    if k >= vals.shape[1]:
        return sort_pairs_t(vals, ids, k)
    v, p = torch.topk(vals, k + 1, dim=1, largest=False, sorted=True)
    sel_v, sel_i = v[:, :k].contiguous(), ids.gather(1, p[:, :k])
    tie = v[:, k - 1] == v[:, k]
    if bool(tie.any()):  # the k-th value is shared beyond the cut: sort those rows fully
        rows = tie.nonzero().squeeze(1)
        sel_v[rows], sel_i[rows] = sort_pairs_t(vals[rows], ids[rows], k)
    return sort_pairs_t(sel_v, sel_i, k)


def score_block(qs: torch.Tensor, bs: torch.Tensor, bsq: torch.Tensor | None, metric: str) -> torch.Tensor:
    """Scores of prepared queries against prepared base rows (see the module docstring).

    For cosine and dot, `qs` must already be negated (cheaper than negating the block).
    """
    if metric == "l2":
        return torch.addmm(bsq, qs, bs.T, beta=1, alpha=-2)
    if metric == "manhattan":
        return torch.cdist(qs, bs, p=1)
    return torch.mm(qs, bs.T)


def finalize_scores(scores: np.ndarray, q_sqnorm: np.ndarray | None, metric: str) -> np.ndarray:
    """Turn |b|^2 - 2 q.b, -q.b and sum |q - b| scores into distances."""
    if metric == "l2":
        return np.sqrt(np.maximum(scores + q_sqnorm[:, None], 0.0))
    if metric == "cosine":
        return np.clip(1.0 + scores, 0.0, 2.0)
    return scores


class TorchBackend(Backend):
    name = "torch"

    def chunks(self, m: int, n: int, k: int, budget: int) -> tuple[int, int]:
        """(queries, base rows) per block: each running task holds one score block plus
        topk's working copy, within its share of the budget."""
        workers = max(1, torch.get_num_threads())
        qc = max(1, min(m, QUERY_CHUNK))
        nc = budget // workers // (2 * 4 * qc)
        if m <= qc:  # few queries: split the base so that every worker gets blocks
            nc = min(nc, -(-n // (2 * workers)))
        return qc, min(n, max(MIN_BASE_CHUNK, k + 1, nc))

    def scan(self, q, b, k, metric, b_sqnorm=None, budget=DEFAULT_MEMORY_BUDGET):
        m, n = q.shape[0], b.shape[0]
        k = min(k, n)
        qt, bt = torch.from_numpy(q), torch.from_numpy(b)
        if metric in ("cosine", "dot"):
            qt = -qt
        bsq = None
        if metric == "l2":
            bsq = torch.from_numpy(b_sqnorm) if b_sqnorm is not None else None
        qc, nc = self.chunks(m, n, k, budget)

        def block(task: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            q0, n0 = task
            bs = bt[n0 : n0 + nc]
            sq = None if metric != "l2" else (bsq[n0 : n0 + nc] if bsq is not None else (bs * bs).sum(1))
            s, p = select_block_t(score_block(qt[q0 : q0 + qc], bs, sq, metric), k)
            return s, p + n0

        tasks = [(q0, n0) for q0 in range(0, m, qc) for n0 in range(0, n, nc)]
        results = run_tasks(block, tasks)
        out_s = torch.empty((m, k), dtype=torch.float32)
        out_i = torch.empty((m, k), dtype=torch.int64)
        per_q = -(-n // nc)
        with single_threaded_ops():
            for j, q0 in enumerate(range(0, m, qc)):
                best = None
                for s, p in results[j * per_q : (j + 1) * per_q]:  # ascending n0: merge_after holds
                    best = merge_after(best, (s, p), k)
                out_s[q0 : q0 + qc], out_i[q0 : q0 + qc] = best
        return out_s.numpy(), out_i.numpy()

    def finalize(self, scores, q_sqnorm, metric):
        return finalize_scores(scores, q_sqnorm, metric)

    def scan_lists(self, qp, vectors, sqnorms, offsets, ids, probes, k, metric, budget=DEFAULT_MEMORY_BUDGET):
        """List-major IVF scan: every probed list is scored against all the queries probing it
        with one matrix product, straight on its slice of the contiguous storage.

        Small lists (under SMALL_LIST_FLOATS floats), where per-list Python overhead would
        dominate, are padded into buckets of similar length and scored with one batched `bmm`
        per bucket. Lists and buckets are tasks for the thread pool; the per-(query, probe)
        candidates are merged by (score, id) at the end.
        """
        nq, nprobe = probes.shape
        d = qp.shape[1]
        qt = torch.from_numpy(qp)
        if metric in ("cosine", "dot"):
            qt = -qt
        vt, it = torch.from_numpy(vectors), torch.from_numpy(ids)
        st = torch.from_numpy(sqnorms) if metric == "l2" else None
        cand_s = torch.full((nq * nprobe, k), float("inf"))
        cand_i = torch.full((nq * nprobe, k), -1, dtype=torch.int64)
        # Pair p = q * nprobe + slot; group the pairs by list.
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        lists, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        sizes = offsets[lists + 1] - offsets[lists]
        keep = sizes > 0
        lists, starts, counts, sizes = lists[keep], starts[keep], counts[keep], sizes[keep]
        workers = max(1, torch.get_num_threads())
        share = budget // workers  # tasks run concurrently
        small = sizes * d <= SMALL_LIST_FLOATS
        tasks: list[tuple[str, np.ndarray, int, int]] = []
        # Buckets of lists with similar query counts and lengths: padding each to the bucket's
        # largest wastes at most about 2x in either.
        by_shape = np.flatnonzero(small)[np.lexsort((sizes[small], counts[small]))]
        i = 0
        while i < len(by_shape):
            first, j, g_max, l_max = by_shape[i], i, 0, 0
            while j < len(by_shape):
                g, length = max(g_max, int(counts[by_shape[j]])), max(l_max, int(sizes[by_shape[j]]))
                too_big = (j - i + 1) * (g * length + length * d + g * d) * 4 > share
                if j > i and (too_big or g > 2 * counts[first] or length > 2 * sizes[first] + 16):
                    break
                g_max, l_max, j = g, length, j + 1
            tasks.append(("bucket", by_shape[i:j], g_max, l_max))
            i = j
        large = np.flatnonzero(~small)
        for part in np.array_split(large, min(len(large), 4 * workers)) if len(large) else []:
            tasks.append(("lists", part, 0, 0))

        def run(task: tuple[str, np.ndarray, int, int]) -> None:
            kind, chosen, g_max, l_max = task
            if kind == "lists":
                for b in chosen:
                    pairs = order[starts[b] : starts[b] + counts[b]]
                    lo, hi = offsets[lists[b]], offsets[lists[b] + 1]
                    if counts[b] * (hi - lo) * 4 * 2 > share:  # too big for one block: chunk it
                        self._scan_one_list(qp, vectors, sqnorms, ids, pairs, lo, hi, nprobe, k, metric,
                                            share, cand_s, cand_i)
                        continue
                    scores = score_block(qt.index_select(0, torch.from_numpy(pairs // nprobe)), vt[lo:hi],
                                         None if st is None else st[lo:hi], metric)
                    vals, pos = select_block_t(scores, min(k, hi - lo), ordered=False)
                    target = torch.from_numpy(pairs)
                    cand_s[target, : vals.shape[1]] = vals
                    cand_i[target, : vals.shape[1]] = it[lo:hi][pos]
            else:
                self._scan_bucket(qt, vt, it, st, offsets, order, starts[chosen], counts[chosen],
                                  lists[chosen], sizes[chosen], g_max, l_max, nprobe, k, metric,
                                  cand_s, cand_i)

        # Each list fills the candidate rows of its own (query, slot) pairs: no overlap.
        run_tasks(run, tasks)
        with single_threaded_ops():
            best = topk_pairs_t(cand_s.view(nq, nprobe * k), cand_i.view(nq, nprobe * k), k)
        return best[0].numpy(), best[1].numpy()

    def _scan_bucket(self, qt, vt, it, st, offsets, order, starts, counts, lists, sizes, g_max, length,
                     nprobe, k, metric, cand_s, cand_i) -> None:
        """Score a bucket of small lists, padded to (lists, g_max queries, length rows), at once."""
        nb, d = len(lists), qt.shape[1]
        t = np.arange(g_max)
        has_pair = t[None, :] < counts[:, None]
        pair = np.where(has_pair, order[np.where(has_pair, starts[:, None] + t[None, :], 0)], 0)
        cols = np.arange(length)
        in_list = cols[None, :] < sizes[:, None]
        rows = np.minimum(offsets[lists][:, None] + cols[None, :], len(vt) - 1)
        rows_t = torch.from_numpy(rows.ravel())
        qb = qt.index_select(0, torch.from_numpy((pair // nprobe).ravel())).view(nb, g_max, d)
        vb = vt.index_select(0, rows_t).view(nb, length, d)
        # A per-row bias of inf marks the padding rows: their scores come out inf, no mask pass.
        pad = torch.from_numpy(~in_list)
        if metric == "manhattan":
            scores = torch.cdist(qb, vb, p=1).masked_fill_(pad.unsqueeze(1), float("inf"))
        elif metric == "l2":
            bias = st.index_select(0, rows_t).view(nb, length).masked_fill_(pad, float("inf"))
            scores = torch.baddbmm(bias.unsqueeze(1), qb, vb.transpose(1, 2), alpha=-2)
        else:
            bias = torch.zeros((nb, length)).masked_fill_(pad, float("inf"))
            scores = torch.baddbmm(bias.unsqueeze(1), qb, vb.transpose(1, 2))
        kk = min(k, length)
        vals, pos = select_block_t(scores.view(nb * g_max, length), kk, ordered=False)
        pos = pos.reshape(nb, g_max * kk)
        # Ids of the chosen rows only (clamped padding positions are masked below).
        at = (torch.from_numpy(offsets[lists]).unsqueeze(1) + pos).clamp_(max=len(it) - 1)
        found = it[at].view(nb * g_max, kk)
        found[~torch.isfinite(vals)] = -1
        sel = torch.from_numpy(has_pair.ravel())
        target = torch.from_numpy(pair.ravel())[sel]
        cand_s[target, :kk] = vals[sel]
        cand_i[target, :kk] = found[sel]

    def _scan_one_list(self, qp, vectors, sqnorms, ids, pairs, lo, hi, nprobe, k, metric, budget,
                       cand_s, cand_i) -> None:
        sq = None if sqnorms is None else sqnorms[lo:hi]
        s, p = self.scan(qp[pairs // nprobe], vectors[lo:hi], k, metric, sq, budget)
        target = torch.from_numpy(pairs)
        cand_s[target, : s.shape[1]] = torch.from_numpy(s)
        cand_i[target, : s.shape[1]] = torch.from_numpy(ids[lo + p])

    def assign(self, x, c, metric, budget=DEFAULT_MEMORY_BUDGET):
        xt, ct = torch.from_numpy(x), torch.from_numpy(c)
        n, kc = x.shape[0], c.shape[0]
        with single_threaded_ops() as workers:
            csq = (ct * ct).sum(1) if metric == "l2" else None
            cneg = -ct if metric in ("cosine", "dot") else ct
        labels = torch.empty(n, dtype=torch.int64)
        cost = torch.empty(n, dtype=torch.float32)
        rows = max(1, min(budget // workers // (2 * 4 * kc), -(-n // (4 * workers))))

        def chunk(s: int) -> None:
            xs = xt[s : s + rows]
            lab = score_block(xs, cneg, csq, metric).argmin(1)  # first index on ties
            labels[s : s + rows] = lab
            cost[s : s + rows] = exact_cost(xs, ct.index_select(0, lab), metric)

        run_tasks(chunk, range(0, n, rows))
        return labels.numpy(), cost.numpy()

    def centroid_sums(self, x, labels, k):
        xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
        step = max(1 << 12, -(-x.shape[0] // (2 * torch.get_num_threads())))

        def part(s: int) -> torch.Tensor:
            return centroid_sums_t(xt[s : s + step], lt[s : s + step], k)[0]

        sums = np.sum(run_tasks(part, range(0, x.shape[0], step)), axis=0)
        return sums, np.bincount(labels, minlength=k)

    def pairwise(self, q, b, metric):
        qt, bt = torch.from_numpy(q), torch.from_numpy(b)
        if metric in ("cosine", "dot"):
            qt = -qt
        bsq = (bt * bt).sum(1) if metric == "l2" else None
        scores = score_block(qt, bt, bsq, metric).numpy()
        return finalize_scores(scores, (q * q).sum(1) if metric == "l2" else None, metric)


def exact_cost(xs: torch.Tensor, cs: torch.Tensor, metric: str) -> torch.Tensor:
    """Cost of each row against its own centroid from the formula (no expansion rounding)."""
    if metric == "l2":
        diff = xs - cs
        return (diff * diff).sum(1)
    if metric == "manhattan":
        return (xs - cs).abs().sum(1)
    dot = (xs * cs).sum(1)
    return (1.0 - dot).clamp_(0.0, 2.0) if metric == "cosine" else -dot


def centroid_sums_t(xt: torch.Tensor, lt: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums and counts (numpy) of the rows of xt under labels lt."""
    d = xt.shape[1]
    sums = torch.zeros((k, d), dtype=torch.float64, device=xt.device)
    step = 1 << 16  # float32 partial sums over at most 65k rows, accumulated in float64
    for s in range(0, xt.shape[0], step):
        part = torch.zeros((k, d), dtype=torch.float32, device=xt.device)
        part.index_add_(0, lt[s : s + step], xt[s : s + step])
        sums += part
    counts = torch.bincount(lt, minlength=k)
    return sums.cpu().numpy(), counts.cpu().numpy()
