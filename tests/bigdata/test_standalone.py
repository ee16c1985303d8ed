"""A standalone Spark cluster on this machine (a master and a worker, real JVMs): the n-gram
command runs on it unchanged, and an executor SIGKILLed while it runs a task is replaced:
Spark retries the lost task and the job completes with the same model as one Python process.

The job is n-gram counting (tasks on the JVM only), so no executor has to import torch and
load MiniLM first. Still five JVMs (master, worker, driver, the executor and the one that
replaces the killed one) start on the machine: 28 s here on a quiet machine, so it runs in
`make test`; MLSYSKIT_SPARK_CLUSTER_TEST=0 skips it (e.g. on a loaded laptop). `benchmarks/spark_pipelines.py
--part cluster` kills an executor in the middle of an ingestion (Python workers embedding with
MiniLM) and records it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import java_env

pytestmark = pytest.mark.skipif(
    os.environ.get("MLSYSKIT_SPARK_CLUSTER_TEST") == "0",
    reason="MLSYSKIT_SPARK_CLUSTER_TEST=0: the standalone-cluster test (5 JVMs) is skipped",
)

TASK_THREAD = "Executor task l"  # "Executor task launch worker ..." as Linux keeps it (15 chars)


def _running_task(pid: int) -> bool:
    """Whether the executor JVM ``pid`` has a task thread (the JVM gives each Java thread
    its name as the native one; the first appears when the executor's first task starts)."""
    try:
        return any((t / "comm").read_text().startswith(TASK_THREAD) for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False


def _corpus(path: Path) -> None:
    """~2 MB of text, 50,000 lines drawn from 2,000 sentences: map tasks of a second or more on
    a cold executor (long enough to kill one in the middle), few distinct n-grams (a quick model)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    base = [" ".join(rng.choices(words, k=rng.randint(3, 14))) + " ." for _ in range(2000)]
    path.write_text("\n".join(rng.choices(base, k=50_000)) + "\n", encoding="utf-8")


def test_killed_executor_is_retried_on_the_standalone_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlsyskit.bigdata.ngram import (
        NgramLM,
        counts_from_sentences,
        estimate_kneser_ney,
        statistics_from_counts,
    )
    from mlsyskit.bigdata.standalone import LocalCluster
    from mlsyskit.bigdata.text import tokenize

    corpus = tmp_path / "corpus.txt"
    _corpus(corpus)
    # every JVM started below (master, worker, driver, executors) gets the test JVM flags
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", java_env()["JAVA_TOOL_OPTIONS"])
    out = tmp_path / "out"
    with LocalCluster(workers=1, cores=1, memory="1g", work_dir=tmp_path / "cluster") as cluster:
        cmd = [sys.executable, "-m", "mlsyskit", "spark", "ngram", "--train", str(corpus), "--order", "3",
               "--samples", "0", "--out", str(out), "--master", cluster.master_url, "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = None
        deadline = time.monotonic() + 180
        while proc.poll() is None and killed is None and time.monotonic() < deadline:
            for pid in cluster.executor_pids():
                if _running_task(pid):
                    time.sleep(0.5)  # into the task: reading and tokenizing its split
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=180)
    assert killed is not None, "no executor ran a task before the job ended"
    assert proc.returncode == 0, stderr[-2000:]
    log = (out / "logs" / "spark.log").read_text()
    lost = [line for line in log.splitlines() if "Lost task" in line and "ExecutorLostFailure" in line]
    assert lost, "Spark did not report a task lost with the killed executor"  # so it was retried
    summary = json.loads(stdout.strip().splitlines()[-1])
    # the model equals the one of a plain Python count of the same corpus
    with open(corpus, encoding="utf-8") as f:
        sentences = [t for t in (tokenize(line) for line in f) if t]
    expected = estimate_kneser_ney(statistics_from_counts(counts_from_sentences(sentences, 3), 3))
    assert summary["train_tokens"] == sum(len(s) for s in sentences)
    got = NgramLM.read_arpa(out / "model.arpa")
    for k in (1, 2, 3):
        assert got.log_probs[k].keys() == expected.log_probs[k].keys()
        assert max(abs(got.log_probs[k][g] - p) for g, p in expected.log_probs[k].items()) < 1e-4
