"""A standalone Spark cluster on this machine (a master and 2 workers, real JVMs): the ingestion
command runs on it unchanged, and an executor SIGKILLed in the middle of the job is replaced:
Spark retries its tasks and the job completes with the same vectors.

Opt-in (3-4 minutes here: five JVMs on two busy cores): MLSYSKIT_SPARK_CLUSTER_TEST=1.
`benchmarks/spark_pipelines.py` runs the same kill on every run and records it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("MLSYSKIT_SPARK_CLUSTER_TEST"),
    reason="starts a 3-JVM standalone cluster (~3-4 min here): set MLSYSKIT_SPARK_CLUSTER_TEST=1",
)


def _runs_python(pid: int) -> bool:
    """Whether the executor JVM ``pid`` has started its Python worker daemon (it forks it, from
    any of its threads, for the first Python task: here the chunking and embedding stage)."""
    try:
        children = [c for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        return any(b"pyspark.daemon" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)
    except OSError:
        return False


def test_killed_executor_is_retried_on_the_standalone_cluster(tmp_path: Path) -> None:
    from mlsyskit.bigdata import chunking
    from mlsyskit.bigdata.ingest import load_ingested
    from mlsyskit.bigdata.standalone import LocalCluster
    from mlsyskit.vector import embed_texts

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"note{i}.md").write_text(f"# Note {i}\n\n" + " ".join(f"word{j % 17} topic{i}" for j in range(150)) + "\n")
    out = tmp_path / "out"
    with LocalCluster(workers=2, cores=1, memory="1g", work_dir=tmp_path / "cluster") as cluster:
        cmd = [sys.executable, "-m", "mlsyskit", "spark", "ingest", "--docs", str(docs), "--out", str(out),
               "--master", cluster.master_url, "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = None
        deadline = time.monotonic() + 300
        while proc.poll() is None and killed is None and time.monotonic() < deadline:
            for pid in cluster.executor_pids():
                if _runs_python(pid):  # a Python worker: the executor runs a task of ours
                    time.sleep(2.0)
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=400)
    assert killed is not None, "no executor ran a Python task before the job ended"
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["files"] == 6 and summary["embedded_files"] == 6
    log = (out / "logs" / "spark.log").read_text()
    assert "Lost executor" in log or "ExecutorLostFailure" in log  # Spark saw the kill and recovered
    corpus = load_ingested(out)
    expected = embed_texts([chunking.embedding_text(t, x) for t, x in zip(corpus.titles, corpus.texts, strict=True)])
    assert np.abs(corpus.vectors - expected).max() < 1e-4
