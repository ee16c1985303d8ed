"""KMeans on the same table: Spark MLlib (through `mlsyskit spark kmeans`' code) vs
`mlsyskit.vector.kmeans` vs scikit-learn: inertia and time.

    .venv/bin/python benchmarks/spark_kmeans.py             # ~5 min on 2 busy cores
    .venv/bin/python benchmarks/spark_kmeans.py --quick

Data: the 5,000 real MNIST training digits (784 pixel columns, 0-255; the label column is
excluded from the features), written once as Parquet and read back by each system. k = 10,
at most 20 iterations, one initialization each (MLlib: k-means||; ours and scikit-learn:
k-means++ with ``n_init=1``), 2 cores. Inertia is the sum of squared distances of the rows
to their nearest centre (MLlib's training cost). Spark's time is the fit of one k on
``local[2]`` (the session start reported apart); then the full command's k choice over 5..15
with silhouettes is timed once too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--out", default=str(common.RESULTS / "spark_kmeans.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1,000 rows, no k sweep")
    args = common.parse_with_quick(p, argv, {})

    import numpy as np
    import pandas as pd
    import torch
    from sklearn.cluster import KMeans as SKMeans

    from mlsyskit.bigdata.kmeans import run_kmeans
    from mlsyskit.bigdata.session import start_session
    from mlsyskit.vector import kmeans

    source = common.find_file("mnist/mnist_5k.csv.gz", common.default_data_dir(existing_only=True))
    if source is None:
        sys.exit("mnist_5k.csv.gz not found: set MLSYSKIT_DATA_DIR")
    raw = np.loadtxt(source, delimiter=",", dtype=np.float32)
    if args.quick:
        raw = raw[::5]
    x, labels = raw[:, :784], raw[:, 784].astype(np.int64)
    work = Path(tempfile.mkdtemp(prefix="spark-kmeans-"))
    table = pd.DataFrame(x, columns=[f"p{i}" for i in range(784)])
    table["label"] = labels
    table.to_parquet(work / "mnist.parquet")
    torch.set_num_threads(2)
    report: dict[str, Any] = {**common.run_stamp(), **common.platform_info(), "cpus": common.usable_cpus(),
                              "loadavg_start": common.loadavgs(), "rows": int(x.shape[0]), "dims": 784, "k": args.k,
                              "max_iter": args.max_iter, "packages": common.package_versions(["pyspark", "scikit-learn", "torch"])}
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    sk = SKMeans(n_clusters=args.k, n_init=1, max_iter=args.max_iter, random_state=0).fit(x)
    rows["scikit-learn"] = {"seconds": round(time.perf_counter() - t0, 3), "inertia": float(sk.inertia_), "iterations": int(sk.n_iter_)}
    t0 = time.perf_counter()
    ours = kmeans(x, args.k, "l2", max_iter=args.max_iter, seed=0)
    rows["mlsyskit.vector.kmeans"] = {"seconds": round(time.perf_counter() - t0, 3), "inertia": float(ours.inertia), "iterations": int(ours.n_iter)}
    t0 = time.perf_counter()
    spark = start_session("local[2]", app_name="bench-kmeans", log_dir=work / "logs")
    report["spark_start_s"] = round(time.perf_counter() - t0, 2)
    summary = run_kmeans(spark, str(work / "mnist.parquet"), work / "one-k", exclude=["label"], k_range=(args.k, args.k),
                         max_iter=args.max_iter, seed=0)
    fit = summary["k_values"][0]
    rows["Spark MLlib (local[2])"] = {"seconds": fit["fit_seconds"], "inertia": fit["inertia"], "iterations": fit["iterations"],
                                      "command_seconds": summary["seconds"]}
    for name, r in rows.items():
        common.log(f"{name}: {r}")
    best = min(r["inertia"] for r in rows.values())
    for r in rows.values():
        r["inertia_over_best"] = round(r["inertia"] / best, 4)
    if not args.quick:
        sweep = run_kmeans(spark, str(work / "mnist.parquet"), work / "sweep", exclude=["label"], k_range=(5, 15),
                           max_iter=args.max_iter, seed=0)
        seg = pd.read_parquet(work / "sweep" / "segments.parquet", columns=["label", "segment"])
        purity = seg.groupby("segment")["label"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(seg)
        report["k_choice"] = {k: sweep[k] for k in ("chosen_k", "silhouette_k", "elbow_k", "seconds")}
        report["k_choice"]["k_values"] = sweep["k_values"]
        report["k_choice"]["purity_of_segments_vs_digit_labels"] = round(float(purity), 4)
        import shutil

        shutil.copy(work / "sweep" / "segments.png", Path(args.out).with_name("spark_kmeans_segments.png"))
    spark.stop()
    report["systems"] = rows
    report["loadavg_end"] = common.loadavgs()
    out = common.write_json(args.out, report)
    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(rows)
    a1.barh(names, [rows[n]["seconds"] for n in names], color="tab:blue")
    a1.set_xlabel("fit seconds")
    a2.barh(names, [rows[n]["inertia"] for n in names], color="tab:orange")
    a2.set_xlabel("inertia")
    a2.set_yticks(range(len(names)), [""] * len(names))
    fig.suptitle(f"KMeans k={args.k} on {x.shape[0]} MNIST digits (load {report['loadavg_start'][0]} at start)")
    common.save_figure(fig, Path(out).with_suffix(".png"))
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
