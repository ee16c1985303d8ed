"""Vector search: distances, exact KNN, KMeans, IVF approximate search (numpy, torch, Triton).

    from mlsyskit.vector import knn, kmeans, IVFIndex
    distances, indices = knn(base, queries, k=10, metric="l2")        # exact, chunked
    result = kmeans(x, k=256, metric="cosine")                         # .centroids .labels .inertia
    index = IVFIndex(d, nlist=1024); index.train(x); index.add(x)
    distances, ids = index.search(queries, k=10, nprobe=16)
    index.save("index.mlskvec"); index = load_index("index.mlskvec")  # IVFFlat or IVFPQ

Metrics: l2, cosine, dot, manhattan (see `mlsyskit.vector.distances`). Back ends: "torch"
(default), "numpy" (the baseline), "triton" (GPU kernels). Names are imported on first use,
so `import mlsyskit.vector` (and the CLI) stays light.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "knn": "mlsyskit.vector.exact_knn",
    "kmeans": "mlsyskit.vector.clustering",
    "KMeansResult": "mlsyskit.vector.clustering",
    "IVFIndex": "mlsyskit.vector.ivf",
    "IVFPQIndex": "mlsyskit.vector.ivfpq",
    "load_index": "mlsyskit.vector.indexes",
    "distance": "mlsyskit.vector.distances",
    "pairwise_distances": "mlsyskit.vector.distances",
    "get_backend": "mlsyskit.vector.backends",
    "our_knn": "mlsyskit.vector.compat",
    "our_kmeans": "mlsyskit.vector.compat",
    "our_ann": "mlsyskit.vector.compat",
    "recall_rate": "mlsyskit.vector.compat",
    "embed_texts": "mlsyskit.vector.embed",
    "METRICS": "mlsyskit.vector._validate",
    "BACKENDS": "mlsyskit.vector._validate",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
