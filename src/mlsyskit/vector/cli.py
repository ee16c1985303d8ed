"""`mlsyskit vector build|search|bench`: IVF indexes and nearest-neighbour search on .npy files.

Imported on every `mlsyskit` invocation: nothing heavy at module level (numpy, torch and the
vector modules are imported inside the handlers).
"""

from __future__ import annotations

import argparse
from typing import Any

from mlsyskit.runtime import add_progress_flag, json_dumps, show_progress

METRICS = ("l2", "cosine", "dot", "manhattan")
BACKENDS = ("torch", "numpy", "triton")


def _load_npy(path: str, what: str) -> Any:
    import numpy as np

    from mlsyskit.errors import UserError

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} path {path} is a directory, not a .npy file") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"cannot read {what} file {path} as a .npy array ({e})") from None


def _save_npy(path: str, array: Any, what: str) -> None:
    import numpy as np

    from mlsyskit.errors import UserError

    try:
        with open(path, "wb") as f:
            np.save(f, array)
    except OSError as e:
        raise UserError(f"cannot write {what} to {path}: {e.strerror or e}") from None


def _nonempty(base: Any, path: str) -> Any:
    from mlsyskit.errors import UserError

    if base.shape[0] == 0:
        raise UserError(f"base ({path}) holds no vectors (shape {tuple(base.shape)}); give a .npy with at least one row")
    return base


def _nlist(given: int | None, n: int) -> int:
    """--nlist as given (at least 1), or the automatic choice when it was not given."""
    from mlsyskit.errors import UserError

    if given is None:
        return _auto_nlist(n)
    if given < 1:
        raise UserError(f"--nlist must be at least 1, got {given} (leave it out for the automatic choice)")
    return given


def _auto_nlist(n: int) -> int:
    from mlsyskit.vector.compat import ann_parameters

    return ann_parameters(n)[0]


def _build(args: argparse.Namespace) -> int:
    import time

    from mlsyskit.errors import UserError
    from mlsyskit.vector._validate import as_matrix
    from mlsyskit.vector.ivf import IVFIndex

    base = _nonempty(as_matrix(_load_npy(args.base, "base"), f"base ({args.base})"), args.base)
    nlist = _nlist(args.nlist, base.shape[0])
    ids = _load_npy(args.ids, "ids") if args.ids else None
    if ids is not None and ids.shape != (base.shape[0],):
        raise UserError(f"ids ({args.ids}) has shape {ids.shape}; expected ({base.shape[0]},), one id per base row")
    t0 = time.perf_counter()
    if args.pq:
        from mlsyskit.vector.ivfpq import IVFPQIndex

        index = IVFPQIndex(base.shape[1], nlist, args.metric, backend=args.backend, m=args.pq, nbits=args.pq_bits)
    else:
        index = IVFIndex(base.shape[1], nlist, args.metric, backend=args.backend)
    km = index.train(base, max_iter=args.max_iter, seed=args.seed, progress=show_progress(args.progress))
    index.add(base, ids)
    index.save(args.out)
    sizes = index.list_sizes()
    print(json_dumps({
        "index": args.out, "kind": index.kind, "ntotal": index.ntotal, "d": index.d, "nlist": nlist,
        "metric": index.metric, "kmeans_iterations": km.n_iter, "kmeans_converged": km.converged,
        "largest_list": int(sizes.max()), "empty_lists": int((sizes == 0).sum()),
        "seconds": round(time.perf_counter() - t0, 3),
    }))
    return 0


def _search(args: argparse.Namespace) -> int:
    import numpy as np

    from mlsyskit.errors import UserError
    from mlsyskit.vector._validate import as_matrix

    queries = _load_npy(args.queries, "queries")
    if args.index:
        from mlsyskit.vector.indexes import load_index

        if args.metric is not None:
            raise UserError("--metric is fixed when the index is built; drop it with --index")
        index = load_index(args.index, backend=args.backend)
        q = as_matrix(queries, f"queries ({args.queries})", allow_vector=True)
        if q.shape[1] != index.d:
            raise UserError(f"queries ({args.queries}) have {q.shape[1]} columns but the index holds d={index.d} vectors")
        dist, ids = index.search(q, args.k, min(args.nprobe, index.nlist))
    else:
        from mlsyskit.vector.exact_knn import knn

        base = _nonempty(as_matrix(_load_npy(args.base, "base"), f"base ({args.base})"), args.base)
        q = as_matrix(queries, f"queries ({args.queries})", allow_vector=True)
        if q.shape[1] != base.shape[1]:
            raise UserError(f"queries ({args.queries}) have {q.shape[1]} columns but the base has {base.shape[1]}")
        dist, ids = knn(base, q, args.k, args.metric or "l2", backend=args.backend)
    if args.out:
        _save_npy(args.out, ids, "ids")
        if args.distances_out:
            _save_npy(args.distances_out, dist.astype(np.float32), "distances")
        print(json_dumps({"queries": int(q.shape[0]), "k": args.k, "ids": args.out,
                          "distances": args.distances_out}))
        return 0
    # a query with fewer than k neighbours in the probed lists is padded with id -1 at an infinite
    # distance, written as null (JSON has no Infinity)
    for i in range(q.shape[0]):
        print(json_dumps({"query": i, "ids": ids[i].tolist(),
                          "distances": [round(float(x), 6) for x in dist[i]]}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from mlsyskit.errors import UserError
    from mlsyskit.vector.compat import recall_rate
    from mlsyskit.vector.exact_knn import knn
    from mlsyskit.vector.ivf import IVFIndex

    for name in ("n", "d", "queries", "k", "clusters"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    try:
        nprobes = [int(p) for p in args.nprobe.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--nprobe takes comma-separated integers, got {args.nprobe!r}") from None
    nlist = _nlist(args.nlist, args.n)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.d), dtype=np.float32) * 2.0

    def sample(n: int) -> np.ndarray:
        return centers[rng.integers(0, args.clusters, n)] + rng.standard_normal((n, args.d), dtype=np.float32)

    base, q = sample(args.n), sample(args.queries)
    rows = []

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    (_, exact), secs = timed(lambda: knn(base, q, args.k, args.metric))
    rows.append({"system": "torch exact", "qps": q.shape[0] / secs, "recall": 1.0})
    nq = min(args.numpy_queries, q.shape[0])
    if nq:
        (_, ids), secs = timed(lambda: knn(base, q[:nq], args.k, args.metric, backend="numpy"))
        rows.append({"system": f"numpy exact ({nq} queries)", "qps": nq / secs, "recall": recall_rate(exact[:nq], ids)})
    index = IVFIndex(args.d, nlist, args.metric)
    _, train_s = timed(lambda: (index.train(base), index.add(base)))
    for p in nprobes:
        if not 1 <= p <= nlist:
            raise UserError(f"--nprobe values must be in [1, nlist={nlist}], got {p}")
        (_, ids), secs = timed(lambda p=p: index.search(q, args.k, p))
        rows.append({"system": f"torch IVF nlist={nlist} nprobe={p}", "qps": q.shape[0] / secs,
                     "recall": recall_rate(exact, ids)})
    print(f"N={args.n} D={args.d} queries={args.queries} k={args.k} metric={args.metric}; IVF built in {train_s:.2f} s")
    for r in rows:
        print(f"  {r['system']:<40s} {r['qps']:>12.1f} queries/s   recall@{args.k} {r['recall']:.4f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `vector` with its build, search and bench actions to the top-level parser."""
    p = sub.add_parser(
        "vector",
        help="vector search: exact KNN, KMeans, IVF approximate search on .npy files",
        description="Vector search on .npy float arrays (one vector per row): build an IVF index, "
        "search it or a raw base exactly, or benchmark on synthetic clustered data.",
    )
    actions = p.add_subparsers(dest="vector_command", metavar="ACTION", parser_class=type(p))
    actions.required = True

    b = actions.add_parser("build", help="train an IVF index on a base .npy and write it",
                           description="Cluster the base with KMeans, file every vector under its "
                           "nearest centroid and write the index (a documented, non-pickle format).")
    b.add_argument("--base", required=True, metavar="X.npy", help="base vectors, shape (N, D), float (required)")
    b.add_argument("--out", required=True, metavar="PATH", help="index file to write (required)")
    b.add_argument("--nlist", type=int, default=None, help="number of lists, at least 1 (default: about sqrt(N), at least 39 vectors per list)")
    b.add_argument("--metric", choices=METRICS, default="l2", help="distance (default: l2)")
    b.add_argument("--ids", metavar="IDS.npy", default=None, help="int ids, one per base row (default: row numbers)")
    b.add_argument("--pq", type=int, default=None, metavar="M", help="compress the lists: product-quantize residuals into M codes a vector, D a multiple of M (IVFPQ; default: off, IVFFlat)")
    b.add_argument("--pq-bits", type=int, default=8, help="bits per PQ code, 1-8, with --pq (default: 8)")
    b.add_argument("--max-iter", type=int, default=20, help="KMeans iterations at most (default: 20)")
    b.add_argument("--seed", type=int, default=0, help="random seed of the KMeans sample and init (default: 0)")
    b.add_argument("--backend", choices=BACKENDS, default="torch", help="compute back end (default: torch)")
    add_progress_flag(b, "the KMeans iterations and PQ codebooks")
    b.set_defaults(func=_build)

    s = actions.add_parser("search", help="k nearest neighbours of query vectors, in an index or a raw base",
                           description="Search an index built by `build` (approximate, --nprobe lists) "
                           "or a raw base .npy (exact). Prints one JSON line per query unless --out is given.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", metavar="PATH", help="an index file written by `mlsyskit vector build`")
    src.add_argument("--base", metavar="X.npy", help="a raw base (N, D) .npy: exact search")
    s.add_argument("--queries", required=True, metavar="Q.npy", help="queries, shape (Q, D) or (D,) (required)")
    s.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
    s.add_argument("--nprobe", type=int, default=8, help="lists probed per query with --index, capped at nlist; a query whose probed lists hold fewer than k vectors is padded with id -1 and distance null (default: 8)")
    s.add_argument("--metric", choices=METRICS, default=None, help="distance for --base (default: l2; an index keeps its own)")
    s.add_argument("--backend", choices=BACKENDS, default="torch", help="compute back end (default: torch)")
    s.add_argument("--out", metavar="IDS.npy", default=None, help="write the (Q, k) int64 ids here instead of printing (default: print JSON lines)")
    s.add_argument("--distances-out", metavar="D.npy", default=None, help="with --out, also write the (Q, k) float32 distances here (default: off)")
    s.set_defaults(func=_search)

    e = actions.add_parser("bench", help="queries per second and recall on synthetic clustered data",
                           description="Exact search (torch and numpy) and IVF at several nprobe on a "
                           "Gaussian mixture; for the full benchmark see benchmarks/vector_search.py.")
    e.add_argument("--n", type=int, default=100_000, help="base vectors (default: 100000)")
    e.add_argument("--d", type=int, default=128, help="dimension (default: 128)")
    e.add_argument("--queries", type=int, default=1000, help="queries (default: 1000)")
    e.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
    e.add_argument("--clusters", type=int, default=256, help="mixture components of the data (default: 256)")
    e.add_argument("--metric", choices=METRICS, default="l2", help="distance (default: l2)")
    e.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about sqrt(N))")
    e.add_argument("--nprobe", default="1,4,16", help="comma-separated nprobe values (default: 1,4,16)")
    e.add_argument("--numpy-queries", type=int, default=20, help="queries timed for the slow numpy baseline; 0 skips it (default: 20)")
    e.add_argument("--seed", type=int, default=0, help="random seed of the data (default: 0)")
    e.set_defaults(func=_bench)
