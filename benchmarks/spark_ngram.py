"""Kneser-Ney n-gram models of Tiny Shakespeare, orders 1-5: held-out perplexity.

    .venv/bin/python benchmarks/spark_ngram.py              # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/spark_ngram.py --orders 1,2

The first 90 % of the lines train (`mlsyskit spark ngram`'s pipeline, `local[2]`), the last
10 % evaluate; tokens as `mlsyskit.bigdata.text.tokenize` makes them (case kept: `--lowercase`
lowercases), each line a sentence; perplexity over every word and each line's `</s>`, words
unseen in training scored as `<unk>`. Standard discounts D = n1 / (n1 + 2 n2) per order.
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
    p.add_argument("--orders", default="1,2,3,4,5")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--out", default=str(common.RESULTS / "spark_ngram.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: orders 1,2")
    args = common.parse_with_quick(p, argv, {"orders": "1,2"})

    from mlsyskit.bigdata.ngram import run_ngram
    from mlsyskit.bigdata.session import start_session

    source = common.find_file("shakespeare/input.txt", common.default_data_dir(existing_only=True))
    if source is None:
        sys.exit("Tiny Shakespeare not found: set MLSYSKIT_DATA_DIR")
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    work = Path(tempfile.mkdtemp(prefix="spark-ngram-"))
    (work / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (work / "eval.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    report: dict[str, Any] = {**common.run_stamp(), **common.platform_info(), "cpus": common.usable_cpus(),
                              "loadavg_start": common.loadavgs(), "train_lines": cut, "eval_lines": len(lines) - cut,
                              "lowercase": args.lowercase, "packages": common.package_versions(["pyspark"])}
    t0 = time.perf_counter()
    spark = start_session("local[2]", app_name="bench-ngram", log_dir=work / "logs")
    report["spark_start_s"] = round(time.perf_counter() - t0, 2)
    rows = []
    for order in [int(x) for x in common.split_names(args.orders)]:
        s = run_ngram(spark, str(work / "train.txt"), order, work / f"order{order}", eval_path=str(work / "eval.txt"),
                      lowercase=args.lowercase, samples=2, seed=0)
        s["arpa_bytes"] = Path(s["arpa"]).stat().st_size
        s.pop("arpa")
        rows.append(s)
        common.log(f"order {order}: perplexity {s['perplexity']:.2f}, {s['ngrams']}, {s['seconds']}s")
    spark.stop()
    report["models"] = rows
    report["loadavg_end"] = common.loadavgs()
    out = common.write_json(args.out, report)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["order"] for r in rows], [r["perplexity"] for r in rows], "o-")
    ax.set_xlabel("order")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Kneser-Ney on Tiny Shakespeare")
    common.save_figure(fig, Path(out).with_suffix(".png"))
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
