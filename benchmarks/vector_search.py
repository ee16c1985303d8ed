"""Vector search: queries per second and recall@10 of numpy, ours and faiss on the same data.

Data: Gaussian mixtures (256 components, unit noise) for N in {4,000; 1,000,000; 4,000,000}
and D in {2, 128, 1024}, and real sentence embeddings (MiniLM, 384-D) of Tiny Shakespeare
lines. For every configuration, on the same query set:

- numpy: the baseline back end (distances from their formulas, argpartition), timed on a
  subset of the queries where it would take minutes;
- ours exact: `knn` on the torch back end (GEMM expansion + topk), the ground truth;
- ours IVF: `IVFIndex` at several nprobe; faiss IndexFlatL2 and IndexIVFFlat with the same
  nlist, the same training sample, the same KMeans iteration count and the same nprobe values;
- KMeans: seconds per Lloyd iteration, torch vs numpy vs faiss.

Recall@10 is against ours exact. Timings share the CPU with whatever else runs on the
machine; compare the ratios measured within one run. A subprocess measures the peak memory
of exact search over 4,000,000 x 128 float32 vectors.

    .venv/bin/python benchmarks/vector_search.py              # full grid, JSON + PNG in benchmarks/results/
    .venv/bin/python benchmarks/vector_search.py --quick      # small sizes for a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import peak_rss_gib, timed  # noqa: E402
from mlsyskit.vector import IVFIndex, kmeans, knn  # noqa: E402

K = 10
RECALL_TARGETS = (0.9, 0.95, 0.99)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4000,1000000,4000000", help="base sizes N (default: 4000,1000000,4000000)")
    p.add_argument("--dims", default="2,128,1024", help="dimensions D (default: 2,128,1024)")
    p.add_argument("--queries", type=int, default=1000, help="queries per configuration (default: 1000)")
    p.add_argument("--nprobes", default="1,2,4,8,16,32,64", help="IVF nprobe values (default: 1,2,4,8,16,32,64)")
    p.add_argument("--components", type=int, default=256, help="Gaussian mixture components (default: 256)")
    p.add_argument("--max-base-gib", type=float, default=8.0, help="skip configurations whose base is larger (default: 8; 4M x 1024 is 16 GiB)")
    p.add_argument("--real-lines", type=int, default=10000, help="Shakespeare lines to embed, 1000 of them the queries (default: 10000)")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="folder with shakespeare/input.txt (default: $MLSYSKIT_DATA_DIR or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-faiss", action="store_true", help="skip faiss even if installed")
    p.add_argument("--no-memory-probe", action="store_true", help="skip the 4M x 128 peak-memory subprocess")
    p.add_argument("--out", default=str(common.RESULTS / "vector_search.json"), help="JSON output (default: benchmarks/results/vector_search.json; the PNG goes beside it)")
    p.add_argument("--quick", action="store_true", help="smoke run: N in {4000, 100000}, D in {2, 128}, 200 queries, 1000 real lines")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # "N,D,Q": internal subprocess mode
    return p.parse_args()


# --- data ----------------------------------------------------------------------------------
def mixture(n: int, d: int, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n points: a random component's center plus unit Gaussian noise, built in chunks."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 18):
        e = min(n, s + (1 << 18))
        out[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] += centers[rng.integers(0, len(centers), e - s)]
    return out


def shakespeare_lines(data_dir: str) -> list[str] | None:
    path = common.find_file("shakespeare/input.txt", data_dir, common.env_data_dir(), common.SHARED_DATA)
    if path is None:
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(x for x in lines if x))


# --- measurement ----------------------------------------------------------------------------
def recall(exact: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(exact, found, strict=True)]))


def numpy_query_count(n: int, d: int, q: int) -> int:
    """Queries the slow baseline gets: about 3e9 element operations, at least 3."""
    return int(max(3, min(q, 3e9 // (n * (d + 8)))))


def first_at(points: list[dict], target: float) -> dict | None:
    """The fastest-probing point (smallest nprobe) that reaches the recall target."""
    return next((p for p in points if p["recall"] >= target), None)


def faiss_module(disabled: bool):
    if disabled:
        return None
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def run_config(data: str, base: np.ndarray, queries: np.ndarray, metric: str, nlist: int,
               nprobes: list[int], faiss, seed: int, pq_m: int | None = None) -> dict:
    n, d = base.shape
    nq = len(queries)
    row: dict = {"data": data, "N": n, "D": d, "metric": metric, "queries": nq, "k": K, "nlist": nlist}
    print(f"\n== {data} N={n:,} D={d} metric={metric} queries={nq} nlist={nlist}", flush=True)

    knn(base, queries[:5], K, metric)  # warm-up: first-call allocations
    (_, exact), secs = timed(knn, base, queries, K, metric)
    row["exact_torch"] = {"qps": nq / secs, "seconds": secs}
    print(f"  ours exact (torch)      {nq / secs:12.1f} q/s", flush=True)

    m = numpy_query_count(n, d, nq)
    (_, ids), secs = timed(knn, base, queries[:m], K, metric, backend="numpy")
    row["exact_numpy"] = {"qps": m / secs, "seconds": secs, "queries": m, "recall": recall(exact[:m], ids)}
    row["exact_speedup_vs_numpy"] = row["exact_torch"]["qps"] / row["exact_numpy"]["qps"]
    print(f"  numpy exact ({m} q)     {m / secs:12.1f} q/s  -> ours {row['exact_speedup_vs_numpy']:.1f}x", flush=True)

    probes = [p for p in nprobes if p <= nlist]
    train_rows = np.sort(np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False))
    sample = base[train_rows]
    row["train_sample"] = len(sample)
    row["kmeans_iterations"] = 10

    if faiss is not None:
        flat = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        flat.add(base)
        flat.search(queries[:5], K)
        (_, ids), secs = timed(flat.search, queries, K)
        row["exact_faiss_flat"] = {"qps": nq / secs, "seconds": secs, "recall": recall(exact, ids)}
        print(f"  faiss IndexFlat         {nq / secs:12.1f} q/s  recall {row['exact_faiss_flat']['recall']:.4f}", flush=True)
        del flat
        gc.collect()

    index = IVFIndex(d, nlist, metric)
    km, train_s = timed(index.train, sample, max_iter=10, seed=seed, max_points_per_centroid=10**9)
    _, add_s = timed(index.add, base)
    index.search(queries[:5], K, 1)
    points = []
    for p in probes:
        (_, ids), secs = timed(index.search, queries, K, p)
        points.append({"nprobe": p, "qps": nq / secs, "recall": recall(exact, ids)})
        print(f"  ours IVF nprobe={p:<4d}    {nq / secs:12.1f} q/s  recall {points[-1]['recall']:.4f}", flush=True)
    sizes = index.list_sizes()
    row["ivf_ours"] = {"train_s": train_s, "add_s": add_s, "kmeans_iters_run": km.n_iter,
                       "largest_list": int(sizes.max()), "points": points}
    del index
    gc.collect()

    if faiss is not None:
        if metric == "cosine":
            quant = faiss.IndexFlatIP(d)
            ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            quant = faiss.IndexFlatL2(d)
            ivf = faiss.IndexIVFFlat(quant, d, nlist)
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        _, ftrain_s = timed(ivf.train, sample)
        _, fadd_s = timed(ivf.add, base)
        fpoints = []
        for p in probes:
            ivf.nprobe = p
            (_, ids), secs = timed(ivf.search, queries, K)
            fpoints.append({"nprobe": p, "qps": nq / secs, "recall": recall(exact, ids)})
            print(f"  faiss IVF nprobe={p:<4d}   {nq / secs:12.1f} q/s  recall {fpoints[-1]['recall']:.4f}", flush=True)
        row["ivf_faiss"] = {"train_s": ftrain_s, "add_s": fadd_s, "points": fpoints}
        del ivf, quant
        gc.collect()

    if pq_m:
        row["ivfpq"] = run_pq(base, queries, exact, sample, nlist, probes, pq_m, faiss, seed)

    # Goals for this configuration.
    at95 = first_at(points, 0.95)
    row["ivf_at_recall_0.95"] = None if at95 is None else {
        "nprobe": at95["nprobe"], "qps": at95["qps"], "recall": at95["recall"],
        "speedup_vs_exact": at95["qps"] / row["exact_torch"]["qps"]}
    if faiss is not None:
        vs = {}
        for t in RECALL_TARGETS:
            ours, theirs = first_at(points, t), first_at(row["ivf_faiss"]["points"], t)
            vs[str(t)] = None if ours is None or theirs is None else {
                "ours_nprobe": ours["nprobe"], "ours_qps": ours["qps"],
                "faiss_nprobe": theirs["nprobe"], "faiss_qps": theirs["qps"],
                "ours_over_faiss": ours["qps"] / theirs["qps"]}
        row["ivf_vs_faiss_at_equal_recall"] = vs
    return row


def run_pq(base, queries, exact, sample, nlist, probes, m, faiss, seed) -> dict:
    """IVFPQ (m one-byte codes a vector), ours and faiss IndexIVFPQ, on the same sample."""
    from mlsyskit.vector import IVFPQIndex

    nq, d = len(queries), base.shape[1]
    out: dict = {"m": m, "nbits": 8, "bytes_per_vector": m, "flat_bytes_per_vector": 4 * d}
    index = IVFPQIndex(d, nlist, m=m, nbits=8)
    _, train_s = timed(index.train, sample, max_iter=10, seed=seed, max_points_per_centroid=10**9, pq_max_iter=10)
    _, add_s = timed(index.add, base)
    points = []
    for p in probes:
        (_, ids), secs = timed(index.search, queries, K, p)
        points.append({"nprobe": p, "qps": nq / secs, "recall": recall(exact, ids)})
        print(f"  ours IVFPQ m={m} nprobe={p:<4d} {nq / secs:10.1f} q/s  recall {points[-1]['recall']:.4f}", flush=True)
    out["ours"] = {"train_s": train_s, "add_s": add_s, "points": points}
    del index
    if faiss is not None:
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, m, 8)
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        _, train_s = timed(ivf.train, sample)
        _, add_s = timed(ivf.add, base)
        fpoints = []
        for p in probes:
            ivf.nprobe = p
            (_, ids), secs = timed(ivf.search, queries, K)
            fpoints.append({"nprobe": p, "qps": nq / secs, "recall": recall(exact, ids)})
            print(f"  faiss IVFPQ m={m} nprobe={p:<4d}{nq / secs:10.1f} q/s  recall {fpoints[-1]['recall']:.4f}", flush=True)
        out["faiss"] = {"train_s": train_s, "add_s": add_s, "points": fpoints}
        del ivf
    gc.collect()
    return out


def kmeans_rows(faiss, seed: int, quick: bool) -> list[dict]:
    configs = [(20_000, 2, 64), (10_000, 128, 64)] if quick else [(100_000, 2, 256), (50_000, 128, 128), (10_000, 1024, 64)]
    rows = []
    for n, d, k in configs:
        rng = np.random.default_rng(seed)
        x = mixture(n, d, rng.standard_normal((k, d), dtype=np.float32) * 2, rng)
        # Same random init for all; seconds per iteration = wall / (iterations + 1): each
        # iteration is one assignment and one update, plus the initial assignment.
        r, secs = timed(kmeans, x, k, max_iter=10, tol=0.0, init="random", seed=seed)
        ours = secs / (r.n_iter + 1)
        rn, secs_np = timed(kmeans, x, k, max_iter=1, tol=0.0, init="random", seed=seed, backend="numpy")
        base_np = secs_np / (rn.n_iter + 1)
        row = {"N": n, "D": d, "k": k, "torch_s_per_iter": ours, "numpy_s_per_iter": base_np,
               "speedup_vs_numpy": base_np / ours, "torch_inertia_after_10": r.inertia}
        if faiss is not None:
            fk = faiss.Kmeans(d, k, niter=10, seed=seed, max_points_per_centroid=10**9)
            _, fs = timed(fk.train, x)
            row["faiss_s_per_iter"] = fs / 10
            row["faiss_inertia_after_10"] = float(fk.obj[-1])
        rows.append(row)
        print(f"  kmeans N={n} D={d} k={k}: torch {ours * 1e3:.1f} ms/iter, numpy {base_np * 1e3:.1f} ms/iter "
              f"({row['speedup_vs_numpy']:.1f}x)" + (f", faiss {row['faiss_s_per_iter'] * 1e3:.1f} ms/iter" if faiss else ""), flush=True)
    return rows


def memory_probe(spec: str) -> None:
    """Subprocess mode: exact search over a fresh N x D base; print time and peak RSS."""
    n, d, q = (int(v) for v in spec.split(","))
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    rss_data = peak_rss_gib()
    _, secs = timed(knn, base, queries, K)
    peak = peak_rss_gib()
    print(json.dumps({"N": n, "D": d, "queries": q, "base_gib": base.nbytes / 2**30, "peak_rss_gib": peak,
                      "peak_rss_before_search_gib": rss_data, "seconds": secs, "qps": q / secs}))


def run_memory_probe(n: int, d: int, q: int) -> dict:
    """Exact search in a fresh process, so its peak RSS is the search's alone."""
    return common.run_json_peer([sys.executable, __file__, "--memory-probe", f"{n},{d},{q}"], timeout=1800)


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    if args.quick:
        args.sizes, args.dims, args.queries, args.real_lines = "4000,100000", "2,128", 200, 1000
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    faiss = faiss_module(args.no_faiss)
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(s) for s in args.dims.split(",")]
    nprobes = [int(s) for s in args.nprobes.split(",")]
    rows, skipped = [], []
    for n in sizes:
        for d in dims:
            gib = n * d * 4 / 2**30
            if gib > args.max_base_gib:
                skipped.append({"N": n, "D": d, "why": f"the base alone is {gib:.0f} GiB (> --max-base-gib {args.max_base_gib:g}); "
                                "with the index copies that ours and faiss hold it does not fit in this machine's 24 GiB"})
                print(f"skip N={n:,} D={d}: {skipped[-1]['why']}", flush=True)
                continue
            rng = np.random.default_rng(args.seed)
            centers = rng.standard_normal((args.components, d), dtype=np.float32)
            base = mixture(n, d, centers, rng)
            queries = mixture(args.queries, d, centers, rng)
            nlist = 2 ** round(math.log2(math.sqrt(n)))
            pq_m = 16 if (n, d) == (1_000_000, 128) or (args.quick and d == 128 and n > 4000) else None
            rows.append(run_config("gaussian-mixture", base, queries, "l2", nlist, nprobes, faiss, args.seed, pq_m))
            del base, queries
            gc.collect()

    real = None
    lines = shakespeare_lines(args.data_dir)
    if lines is None:
        skipped.append({"data": "shakespeare-minilm", "why": "shakespeare/input.txt not found under --data-dir, $MLSYSKIT_DATA_DIR or ../shared/data"})
        print("skip real embeddings: Shakespeare text not found", flush=True)
    else:
        try:
            from mlsyskit.vector.embed import embed_texts

            rng = random.Random(args.seed)
            rng.shuffle(lines)
            lines = lines[: args.real_lines]
            emb, secs = timed(embed_texts, lines)
            nq = min(1000, len(lines) // 10)
            real = {"lines": len(lines), "embed_seconds": secs, "lines_per_s": len(lines) / secs}
            print(f"embedded {len(lines)} Shakespeare lines in {secs:.1f} s", flush=True)
            base, queries = emb[nq:], emb[:nq]
            nlist = 2 ** round(math.log2(math.sqrt(len(base))))
            rows.append(run_config("shakespeare-minilm", base, queries, "cosine", nlist, nprobes, faiss, args.seed))
        except Exception as e:  # the wheel or transformers missing: say so, keep the rest
            skipped.append({"data": "shakespeare-minilm", "why": f"embedding failed: {e}"})
            print(f"skip real embeddings: {e}", flush=True)

    print("\n== KMeans", flush=True)
    km = kmeans_rows(faiss, args.seed, args.quick)

    probe = None
    if not args.no_memory_probe and not args.quick:
        print("\n== peak memory of exact search, 4,000,000 x 128 float32 (subprocess)", flush=True)
        probe = run_memory_probe(4_000_000, 128, 1000)
        print(f"  {probe}", flush=True)

    result = {
        "benchmark": "vector_search",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads() if faiss else None,
                    "torch": torch.__version__, "numpy": np.__version__, "faiss": getattr(faiss, "__version__", None),
                    "note": "the CPU was shared with other jobs during the run: compare ratios within this run"},
        "method": {
            "data": f"Gaussian mixture: {args.components} centers ~ N(0, I), points = center + N(0, I); queries drawn the same way; seed {args.seed}",
            "recall": "recall@10 against ours exact (torch back end)",
            "numpy": "the numpy back end (distances from their formulas by broadcasting, argpartition), timed on the first `queries` queries",
            "ivf": "nlist = 2^round(log2(sqrt(N))); both ours and faiss train 10 KMeans iterations on the same sample of min(N, 64 nlist) rows",
            "faiss": "IndexFlatL2 / IndexIVFFlat (IndexFlatIP / inner-product IVF on the unit-norm real embeddings)",
            "ivfpq": "at N=1M, D=128 only: ours IVFPQIndex and faiss IndexIVFPQ, m=16 codes of 8 bits (16 bytes a vector), same nlist and training sample",
        },
        "configs": rows, "skipped": skipped, "real_embeddings": real, "kmeans": km, "memory_probe_4M_x_128": probe,
        "goals": goals(rows, km), "seconds_total": time.perf_counter() - t_start,
    }
    out = common.write_json(args.out, result)
    plot(rows, km, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['seconds_total'] / 60:.1f} min")
    print(json.dumps(result["goals"], indent=2))


def goals(rows: list[dict], km: list[dict]) -> dict:
    exact = [(r["N"], r["D"], r["data"], r["exact_speedup_vs_numpy"]) for r in rows]
    at_1m = [(r["D"], r["ivf_at_recall_0.95"]) for r in rows if r["N"] == 1_000_000]
    vs_faiss = [(r["N"], r["D"], r["data"], (r.get("ivf_vs_faiss_at_equal_recall") or {}).get("0.95")) for r in rows]
    vs_faiss = [v for v in vs_faiss if v[3] is not None]
    out = {
        "exact_at_least_5x_numpy": {
            "min_speedup": min(e[3] for e in exact) if exact else None,
            "per_config": [{"N": n, "D": d, "data": s, "speedup": x} for n, d, s, x in exact],
            "met": bool(exact) and all(e[3] >= 5 for e in exact)},
        "ivf_recall_0.95_at_10x_exact_qps_at_1M": {
            "per_D": [{"D": d, **(a or {"nprobe": None})} for d, a in at_1m],
            "met": bool(at_1m) and all(a is not None and a["speedup_vs_exact"] >= 10 for _, a in at_1m)},
        "ivf_within_2x_of_faiss_at_recall_0.95": {
            "per_config": [{"N": n, "D": d, "data": s, **v} for n, d, s, v in vs_faiss],
            "met": bool(vs_faiss) and all(v[3]["ours_over_faiss"] >= 0.5 for v in vs_faiss)},
        "kmeans_at_least_5x_numpy": {
            "per_config": [{"N": r["N"], "D": r["D"], "k": r["k"], "speedup": r["speedup_vs_numpy"]} for r in km],
            "met": bool(km) and all(r["speedup_vs_numpy"] >= 5 for r in km)},
    }
    return out


def plot(rows: list[dict], km: list[dict], path: Path) -> None:
    plt = common.pyplot()
    curves = [r for r in rows if r["N"] >= 100_000 or r["data"] != "gaussian-mixture"]
    ncol = 4
    nrow = max(1, math.ceil((len(curves) + 2) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 4 * nrow), squeeze=False)
    flat = list(axes.ravel())
    for ax, r in zip(flat, curves, strict=False):
        pts = r["ivf_ours"]["points"]
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], "o-", label="ours IVF")
        for p in pts:
            ax.annotate(str(p["nprobe"]), (p["recall"], p["qps"]), fontsize=6)
        if "ivf_faiss" in r:
            fp = r["ivf_faiss"]["points"]
            ax.plot([p["recall"] for p in fp], [p["qps"] for p in fp], "s--", label="faiss IVFFlat")
        ax.scatter([1.0], [r["exact_torch"]["qps"]], marker="*", s=120, label="ours exact", zorder=3)
        if "exact_faiss_flat" in r:
            ax.scatter([1.0], [r["exact_faiss_flat"]["qps"]], marker="^", s=60, label="faiss Flat", zorder=3)
        ax.scatter([1.0], [r["exact_numpy"]["qps"]], marker="x", s=60, label="numpy", zorder=3)
        ax.set_yscale("log")
        ax.set_title(f"{r['data']} N={r['N']:,} D={r['D']}", fontsize=9)
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries / s")
        ax.legend(fontsize=6)
    rest = flat[len(curves):]
    if rest:
        ax = rest[0]
        labels = [f"{r['N'] // 1000}k x {r['D']}" + ("*" if r["data"] != "gaussian-mixture" else "") for r in rows]
        x = np.arange(len(rows))
        ax.bar(x - 0.25, [r["exact_numpy"]["qps"] for r in rows], 0.25, label="numpy")
        ax.bar(x, [r["exact_torch"]["qps"] for r in rows], 0.25, label="ours exact")
        ax.bar(x + 0.25, [r.get("exact_faiss_flat", {}).get("qps", 0) for r in rows], 0.25, label="faiss Flat")
        ax.set_xticks(x, labels, rotation=45, fontsize=6)
        ax.set_yscale("log")
        ax.set_title("exact search (* real embeddings)", fontsize=9)
        ax.set_ylabel("queries / s")
        ax.legend(fontsize=6)
    if len(rest) > 1 and km:
        ax = rest[1]
        labels = [f"{r['N'] // 1000}k x {r['D']}, k={r['k']}" for r in km]
        x = np.arange(len(km))
        ax.bar(x - 0.25, [r["numpy_s_per_iter"] * 1e3 for r in km], 0.25, label="numpy")
        ax.bar(x, [r["torch_s_per_iter"] * 1e3 for r in km], 0.25, label="ours (torch)")
        ax.bar(x + 0.25, [r.get("faiss_s_per_iter", 0) * 1e3 for r in km], 0.25, label="faiss")
        ax.set_xticks(x, labels, rotation=20, fontsize=6)
        ax.set_yscale("log")
        ax.set_title("KMeans: ms per iteration", fontsize=9)
        ax.legend(fontsize=6)
    for ax in rest[2:]:
        ax.axis("off")
    common.save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    main()
