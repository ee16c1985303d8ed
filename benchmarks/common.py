"""Shared pieces of the benchmark scripts: paths and arguments, timing, machine and load
information, peak memory of a process or a process tree, launching peers (a system run in its
own process), JSON and PNG writing.

The scripts run as `.venv/bin/python benchmarks/X.py`, so this folder is on sys.path and they
`import common` (each also puts the folder there itself, for other ways of starting them).
Nothing heavy is imported at module level (psutil and matplotlib load inside the functions
that need them): Flower's Ray actors import the FL peer modules, and with them this one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------
# Paths and arguments
# --------------------------------------------------------------------------------------


def env_data_dir() -> str | None:
    """$MLSYSKIT_DATA_DIR, or None when it is unset or empty."""
    return os.environ.get("MLSYSKIT_DATA_DIR", "").strip() or None


def default_data_dir(existing_only: bool = False) -> str | None:
    """$MLSYSKIT_DATA_DIR, else ../shared/data next to the repository. With existing_only
    the shared folder is returned (resolved) only when it exists, else None."""
    env = env_data_dir()
    if env:
        return env
    if existing_only:
        shared = SHARED_DATA.resolve()
        return str(shared) if shared.is_dir() else None
    return str(SHARED_DATA)


def find_file(rel: str | Path, *roots: str | Path | None) -> Path | None:
    """The first ``root / rel`` that is a file; empty or None roots are skipped."""
    for root in roots:
        if root:
            path = Path(root) / rel
            if path.is_file():
                return path
    return None


def split_names(spec: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def parse_with_quick(
    parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Parse; with --quick, parse again with ``quick`` as the defaults, so that flags given
    explicitly still win over the smoke-run sizes."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """(fn(*args, **kwargs), wall seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def log(msg: str) -> None:
    """Print with a wall-clock time stamp (long runs: when did each step happen)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def decode_tok_s(n_tokens: int, first: float, last: float) -> float | None:
    """Decode tokens/s from the first to the last token (prefill left out), 2 decimals."""
    return round((n_tokens - 1) / (last - first), 2) if last > first else None


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` rotated by ``turn``: systems taking turns start in a different order each
    round, so no one always runs right after the same neighbour."""
    items = list(items)
    if not items:
        return items
    shift = turn % len(items)
    return items[shift:] + items[:shift]


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile, 4 decimals; None for no values."""
    return round(float(np.percentile(xs, q)), 4) if len(xs) else None


# --------------------------------------------------------------------------------------
# Machine and load (these machines are shared: record how busy they were)
# --------------------------------------------------------------------------------------


def loadavg() -> float:
    """The 1-minute load average, 2 decimals."""
    return round(os.getloadavg()[0], 2)


def loadavgs() -> list[float]:
    """The 1-, 5- and 15-minute load averages, 2 decimals."""
    return [round(x, 2) for x in os.getloadavg()]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def platform_info() -> dict[str, str]:
    return {"platform": platform.platform(), "python": platform.python_version()}


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each package (keys as given, "_" looked up as "-"), None if absent."""
    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_stamp() -> dict[str, str]:
    """When the report was made and the command line that made it."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a subprocess would report the parent's size."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # KiB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def watch_tree(proc: subprocess.Popen, interval: float, pss_every: float, timeout: float) -> dict[str, Any]:
    """Poll the child's process tree until it exits; peak of the summed RSS (and PSS).

    On timeout the whole tree is killed; processes of the tree that outlive the child (e.g.
    Ray daemons) are ended by pid afterwards.
    """
    import psutil

    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    peak_procs = samples = 0
    seen: dict[int, psutil.Process] = {root.pid: root}
    cpu: dict[int, float] = {}
    last_pss = 0.0
    deadline = time.monotonic() + timeout
    timed_out = False
    while proc.poll() is None:
        if time.monotonic() > deadline:
            timed_out = True
            break
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            seen.setdefault(p.pid, p)
            try:
                with p.oneshot():
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        peak_rss = max(peak_rss, total)
        peak_procs = max(peak_procs, len(procs))
        samples += 1
        now = time.monotonic()
        if now - last_pss >= pss_every:  # PSS reads smaps: costlier, so sampled less often
            last_pss = now
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            peak_pss = max(peak_pss, pss)
        time.sleep(interval)
    if timed_out:
        for p in reversed(list(seen.values())):
            try:
                p.kill()
            except psutil.Error:
                pass
    proc.wait()
    leftovers = []
    for pid, p in seen.items():
        if pid == root.pid:
            continue
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{pid} {p.name()}")
                p.terminate()
        except psutil.Error:
            pass
    return {
        "peak_rss_mib": peak_rss / MIB,
        "peak_pss_mib": peak_pss / MIB,
        "peak_processes": peak_procs,
        "memory_samples": samples,
        "cpu_s_tree": sum(cpu.values()),
        "leftover_processes_terminated": leftovers,
        "timed_out": timed_out,
    }


# --------------------------------------------------------------------------------------
# Peers: a system run in its own process
# --------------------------------------------------------------------------------------


def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def run_peer(
    cmd: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_interval: float = 0.05,
    pss_interval: float = 1.0,
    timeout: float = 3600.0,
) -> tuple[dict[str, Any], float, float]:
    """Run ``cmd`` to the end, its output to ``log_path``, watching its process tree.

    Returns (report, spawn wall time, end wall time). The report holds the exit code, the
    tree's peak memory and CPU seconds, the load average before and after, and the CPU
    seconds the rest of the machine used meanwhile (other users' jobs: the noise check).
    """
    import psutil

    me = psutil.Process()
    load_before = loadavg()
    busy0, mine0 = _busy_cpu_s(), sum(me.cpu_times()[:2])
    with open(log_path, "w") as logf:
        spawn = time.time()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        mem = watch_tree(proc, poll_interval, pss_interval, timeout)
    end = time.time()
    busy, mine = _busy_cpu_s() - busy0, sum(me.cpu_times()[:2]) - mine0
    res: dict[str, Any] = {"exit_code": proc.returncode, "log": str(log_path), "process_wall_s": end - spawn}
    res["loadavg_1m_before"] = load_before
    res["loadavg_1m_after"] = loadavg()
    res.update(mem)
    res["cpu_s_monitor"] = mine
    res["cpu_s_other_processes"] = max(busy - mem["cpu_s_tree"] - mine, 0.0)
    return res, spawn, end


def run_json_peer(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` and parse the JSON on the last line of its stdout; {"error": ...} (its last
    stderr line) when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def spawn_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr going to ``log_path``."""
    with open(log_path, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_for_output(
    proc: subprocess.Popen, log_path: Path, pattern: re.Pattern[str], timeout: float
) -> re.Match[str] | None:
    """Until ``pattern`` shows in the log (its match), or the process exits or time runs out
    (None)."""
    deadline = time.monotonic() + timeout
    while not (m := pattern.search(log_path.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return m


def stop_process(proc: subprocess.Popen, grace: float = 90.0) -> int | None:
    """SIGTERM (a clean shutdown), SIGKILL after ``grace`` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --------------------------------------------------------------------------------------
# Output: JSON and PNG
# --------------------------------------------------------------------------------------


def write_json(path: str | Path, obj: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as valid JSON (NaN/Infinity as null, see ``mlsyskit.runtime.json_dumps``)
    plus a final newline, creating the folder."""
    from mlsyskit.runtime import json_dumps

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_dumps(obj, indent=indent, default=default) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg back end (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Lay out, save and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
