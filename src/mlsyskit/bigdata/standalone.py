"""A Spark standalone cluster on this machine: one master and N workers, real JVM processes.

    with LocalCluster(workers=2) as cluster:              # spark://127.0.0.1:PORT
        with spark_session(cluster.master_url) as spark:   # the same jobs, unchanged
            ...
        cluster.executor_pids()                           # the executor JVMs of running apps

Everything binds to 127.0.0.1 on ports the processes pick themselves (the master's is read
from its log). Daemons and executors log to files in ``work_dir``. Used by the benchmark (the
same jobs on a cluster give the same results) and by the test that kills an executor.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from mlsyskit.bigdata.session import LOOPBACK, log4j_config, prepare_environment
from mlsyskit.errors import UserError

_MASTER_URL = re.compile(r"Starting Spark master at (spark://\S+)")
_WORKER_OK = re.compile(r"Successfully registered with master")


class LocalCluster:
    """A standalone master and ``workers`` workers (``cores`` and ``memory`` each)."""

    def __init__(
        self,
        workers: int = 2,
        *,
        cores: int = 1,
        memory: str = "1g",
        work_dir: str | Path | None = None,
        timeout: float = 120.0,
    ) -> None:
        if workers < 1 or cores < 1:
            raise UserError("a local cluster needs at least one worker with one core")
        self.workers, self.cores, self.memory, self.timeout = workers, cores, memory, timeout
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="mlsyskit-cluster-")).resolve()
        self.master_url = ""
        self._procs: list[subprocess.Popen] = []

    def _spark_class(self) -> Path:
        import pyspark

        home = Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)
        return home / "bin" / "spark-class"

    def _start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.work_dir / f"{name}.log"
        conf = log4j_config(self.work_dir / name, level="INFO")
        env = dict(os.environ)
        env["SPARK_DAEMON_JAVA_OPTS"] = f"-Dlog4j2.configurationFile=file:{conf}"
        env["SPARK_LOG_DIR"] = str(self.work_dir)
        env["SPARK_NO_DAEMONIZE"] = "1"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(self._spark_class()), *args], stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        self._procs.append(proc)
        return proc, self.work_dir / name / "spark.log"

    def _wait_for(self, proc: subprocess.Popen, log: Path, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if log.exists():
                m = pattern.search(log.read_text(errors="replace"))
                if m:
                    return m
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise UserError(f"the local Spark cluster's {what} did not start (see {log})")

    def start(self) -> LocalCluster:
        """Start the master, then the workers; returns once every worker has registered."""
        prepare_environment()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        master, mlog = self._start("master", ["org.apache.spark.deploy.master.Master", "--host", LOOPBACK, "--port", "0", "--webui-port", "0"])
        self.master_url = self._wait_for(master, mlog, _MASTER_URL, "master").group(1)
        started = []
        for i in range(self.workers):
            started.append(self._start(f"worker{i}", [
                "org.apache.spark.deploy.worker.Worker", "--host", LOOPBACK, "--port", "0", "--webui-port", "0",
                "--cores", str(self.cores), "--memory", self.memory, "--work-dir", str(self.work_dir / f"worker{i}" / "work"),
                self.master_url,
            ]))
        for i, (proc, log) in enumerate(started):
            self._wait_for(proc, log, _WORKER_OK, f"worker {i}")
        return self

    def executor_pids(self) -> list[int]:
        """PIDs of the executor JVMs our workers have launched (children of the worker JVMs:
        spark-class execs the JVM, so a worker's PID is its Popen's)."""
        workers = {p.pid for p in self._procs[1:]}
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                status = (d / "status").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
            if ppid in workers and b"CoarseGrainedExecutorBackend" in cmd:
                pids.append(int(d.name))
        return sorted(pids)

    def stop(self) -> None:
        """Stop the workers (and so their executors), then the master."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()

    def cleanup(self) -> None:
        """Stop and remove the work directory."""
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
