"""KMeans on Spark MLlib over a table from any Spark-readable URI, with the choice of k.

    summary = run_kmeans(spark, "hdfs://nn/records.parquet", "out/", k_range=(2, 8))

* **Input**: CSV (with a header; types inferred), Parquet or JSON lines, a file or a folder,
  ``hdfs://`` when Hadoop is configured, local otherwise. Features: the numeric columns (or
  ``features``), minus ``exclude``; rows with a missing feature are dropped and counted.
  ``standardize`` scales each feature to mean 0 and variance 1 first.
* **k**: MLlib's KMeans (k-means||, ``max_iter``, ``seed``) is fitted for each k in the range;
  for each, the inertia (sum of squared distances to the nearest centre, MLlib's training cost)
  and the silhouette (MLlib's ``ClusteringEvaluator``, squared Euclidean). The silhouette's
  maximum picks k by default; the elbow (the k farthest below the straight line from the first
  to the last inertia, both axes scaled to [0, 1]) is reported and can pick instead.
* **Output**: ``segments.parquet`` (the input rows with a ``segment`` column), ``kmeans.json``
  (every k's inertia and silhouette, the choice, the centres in the input's units, segment
  sizes) and ``segments.png``: the rows projected on their first two principal components
  (MLlib's PCA; a sample of at most 5,000 points) coloured by segment, with the centres, next
  to inertia and silhouette against k.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError

PLOT_POINTS = 5000
_NUMERIC = ("int", "bigint", "smallint", "tinyint", "double", "float", "decimal")


def infer_format(uri: str) -> str:
    """csv, parquet or json from the file name (a local folder: from the files inside)."""
    from mlsyskit.bigdata.io import local_path

    name = uri.rstrip("/").lower()
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".parquet", "parquet"),
                        (".json", "json"), (".jsonl", "json"), (".ndjson", "json")):
        if name.endswith(suffix):
            return fmt
    path = local_path(uri)
    if path is not None and path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.name.startswith((".", "_")):
                return infer_format(str(f))
    if path is not None and path.is_file():
        raise UserError(f"--input {uri}: cannot tell the format from the name; give --format csv|parquet|json")
    return "parquet"


def read_table(spark: Any, uri: str, fmt: str = "auto") -> Any:
    """The table at ``uri`` as a DataFrame."""
    from mlsyskit.bigdata.io import spark_errors

    fmt = infer_format(uri) if fmt == "auto" else fmt
    with spark_errors(f"--input {uri}"):
        if fmt == "csv":
            sep = "\t" if uri.lower().endswith(".tsv") else ","
            return spark.read.option("header", "true").option("inferSchema", "true").option("sep", sep).csv(uri)
        if fmt == "json":
            return spark.read.json(uri)
        if fmt == "parquet":
            return spark.read.parquet(uri)
    raise UserError(f"unknown format {fmt!r}; choose csv, parquet or json")


def feature_columns(df: Any, features: list[str] | None, exclude: list[str] | None) -> list[str]:
    """The numeric feature columns (a clear error for unknown or non-numeric names)."""
    types = dict(df.dtypes)
    exclude = exclude or []
    for name in [*(features or []), *exclude]:
        if name not in types:
            raise UserError(f"no column {name!r}; the table has: {', '.join(types)}")
    if features:
        bad = [c for c in features if not types[c].startswith(_NUMERIC)]
        if bad:
            raise UserError(f"feature column(s) {', '.join(bad)} are not numeric ({', '.join(types[c] for c in bad)})")
        cols = [c for c in features if c not in exclude]
    else:
        cols = [c for c, t in df.dtypes if t.startswith(_NUMERIC) and c not in exclude]
    if not cols:
        raise UserError("no numeric feature column; name them with --features")
    return cols


def elbow_k(ks: list[int], inertias: list[float]) -> int:
    """The k farthest below the line from the first to the last point, both axes scaled to
    [0, 1] (the "kneedle" rule); the first k when there are fewer than 3."""
    if len(ks) < 3:
        return ks[0]
    x0, x1 = ks[0], ks[-1]
    lo, hi = min(inertias), max(inertias)
    span = (hi - lo) or 1.0
    xs = [(k - x0) / (x1 - x0) for k in ks]
    ys = [(v - lo) / span for v in inertias]
    # the line from (0, ys[0]) to (1, ys[-1]); distance below it
    gaps = [(ys[0] + (ys[-1] - ys[0]) * x) - y for x, y in zip(xs, ys, strict=True)]
    return ks[max(range(len(ks)), key=lambda i: gaps[i])]


def run_kmeans(
    spark: Any,
    uri: str,
    out: str | Path,
    *,
    fmt: str = "auto",
    features: list[str] | None = None,
    exclude: list[str] | None = None,
    k_range: tuple[int, int] = (2, 8),
    choose: str = "silhouette",
    standardize: bool = False,
    max_iter: int = 20,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Fit MLlib KMeans for each k, choose k, write the segments, the summary and the plot."""
    import numpy as np
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.evaluation import ClusteringEvaluator
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    from mlsyskit.bigdata.io import prepare_out, spark_errors, write_json

    if choose not in ("silhouette", "elbow"):
        raise UserError(f"--choose must be silhouette or elbow, got {choose!r}")
    out_dir = prepare_out(out)
    step = progress.step if progress is not None else (lambda what: contextlib.nullcontext())
    t0 = time.perf_counter()
    df = read_table(spark, uri, fmt)
    cols = feature_columns(df, features, exclude)
    with spark_errors(f"--input {uri}"), step("reading and assembling the features"):
        assembled = VectorAssembler(inputCols=cols, outputCol="_raw", handleInvalid="skip").transform(df)
        if standardize:
            scaler = StandardScaler(inputCol="_raw", outputCol="features", withMean=True, withStd=True).fit(assembled)
            data = scaler.transform(assembled).drop("_raw")
        else:
            scaler = None
            data = assembled.withColumnRenamed("_raw", "features")
        data = data.cache()
        rows = data.count()
        total_rows = df.count()
    if rows == 0:
        raise UserError(f"--input {uri}: no row with all of {', '.join(cols)} present")
    lo, hi = k_range
    if lo < 2:
        raise UserError(f"k must be at least 2, got {lo}")
    if hi > rows:
        raise UserError(f"k up to {hi} needs at least {hi} rows; the table has {rows}")
    evaluator = ClusteringEvaluator(featuresCol="features", predictionCol="segment", distanceMeasure="squaredEuclidean")
    results: list[dict[str, Any]] = []
    models = {}
    for k in range(lo, hi + 1):
        with step(f"KMeans k={k}"):
            tk = time.perf_counter()
            model = KMeans(k=k, seed=seed, maxIter=max_iter, featuresCol="features", predictionCol="segment").fit(data)
            fit_s = time.perf_counter() - tk
            sil = evaluator.evaluate(model.transform(data)) if hi > lo else None
        models[k] = model
        results.append({"k": k, "inertia": float(model.summary.trainingCost), "silhouette": None if sil is None else round(float(sil), 6),
                        "iterations": int(model.summary.numIter), "fit_seconds": round(fit_s, 3)})
    ks = [r["k"] for r in results]
    k_elbow = elbow_k(ks, [r["inertia"] for r in results])
    k_sil = max(results, key=lambda r: r["silhouette"] if r["silhouette"] is not None else -2)["k"]
    chosen = k_sil if choose == "silhouette" else k_elbow
    model = models[chosen]
    centers = np.asarray([c for c in model.clusterCenters()], np.float64)
    if scaler is not None:  # back to the input's units
        centers = centers * scaler.std.toArray() + scaler.mean.toArray()
    with spark_errors(f"--out {out}"), step("writing the segments"):
        segments = model.transform(data)
        sizes = {int(r["segment"]): int(r["count"]) for r in segments.groupBy("segment").count().collect()}
        segments.drop("features").write.mode("overwrite").parquet(str(out_dir / "segments.parquet"))
    with step("plotting"):
        plot = _plot(segments, rows, model, results, chosen, out_dir / "segments.png", len(cols), seed)
    data.unpersist()
    chosen_row = next(r for r in results if r["k"] == chosen)
    summary = {
        "input": uri, "rows": rows, "dropped_rows": int(total_rows - rows), "features": cols,
        "standardized": standardize, "k_values": results, "chosen_k": chosen, "chosen_by": choose if hi > lo else "given",
        "elbow_k": k_elbow, "silhouette_k": k_sil, "inertia": chosen_row["inertia"], "silhouette": chosen_row["silhouette"],
        "sizes": [sizes.get(i, 0) for i in range(chosen)], "centers": [[round(float(x), 6) for x in c] for c in centers],
        "parquet": str(out_dir / "segments.parquet"), "plot": plot, "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out_dir / "kmeans.json", summary)
    return summary


def _plot(segments: Any, n: int, model: Any, results: list[dict[str, Any]], chosen: int, path: Path, dims: int, seed: int) -> str:
    """Points on their first two principal components (a sample of the ``n`` rows of
    ``segments``), coloured by segment; inertia and silhouette against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from pyspark.ml.feature import PCA

    sample = segments.sample(False, min(1.0, PLOT_POINTS / max(n, 1)), seed).select("features", "segment")
    centers = np.asarray(model.clusterCenters(), np.float64)
    if dims >= 2:
        pca = PCA(k=2, inputCol="features", outputCol="xy").fit(sample if sample.count() >= 2 else segments)
        pdf = pca.transform(sample).select("xy", "segment").toPandas()
        xy = np.stack([v.toArray() for v in pdf["xy"]]) if len(pdf) else np.zeros((0, 2))
        cxy = centers @ pca.pc.toArray()
        labels = ("PC 1", "PC 2")
    else:
        pdf = sample.toPandas()
        xy = np.stack([[v.toArray()[0], 0.0] for v in pdf["features"]]) if len(pdf) else np.zeros((0, 2))
        cxy = np.stack([centers[:, 0], np.zeros(len(centers))], 1)
        labels = ("feature", "")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.scatter(xy[:, 0], xy[:, 1], c=pdf["segment"].to_numpy() if len(pdf) else [], cmap="tab10", s=6, alpha=0.7)
    ax.scatter(cxy[:, 0], cxy[:, 1], c="black", marker="x", s=80, label="centres")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"{chosen} segments ({len(pdf)} of {n} rows shown)")
    ax.legend(loc="best")
    ks = [r["k"] for r in results]
    ax2.plot(ks, [r["inertia"] for r in results], "o-", color="tab:blue")
    ax2.set_xlabel("k")
    ax2.set_ylabel("inertia", color="tab:blue")
    if any(r["silhouette"] is not None for r in results):
        ax3 = ax2.twinx()
        ax3.plot(ks, [r["silhouette"] for r in results], "s--", color="tab:orange")
        ax3.set_ylabel("silhouette", color="tab:orange")
    ax2.axvline(chosen, color="gray", linestyle=":")
    ax2.set_title("choice of k")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
