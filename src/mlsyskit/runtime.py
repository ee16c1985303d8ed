"""Process-level tuning shared by the long-running jobs."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    Training and evaluation allocate and free tensors of tens of MB every step; by default
    glibc serves those with fresh mmap()s, so each step pays page faults on memory it just
    freed (measured here: CNN evaluation on 10k MNIST digits 1.5-1.8x faster with this).
    Returns False (and changes nothing) where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def add_progress_flag(p: argparse.ArgumentParser, what: str) -> None:
    """The one progress switch of every long-running command: ``--progress/--no-progress``,
    on by default when stderr is a terminal (so logs and pipes stay clean)."""
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar over {what} on stderr (default: on when stderr is a terminal)",
    )


def show_progress(flag: bool | None) -> bool:
    """The value of a ``--progress/--no-progress`` flag, the terminal deciding when not given."""
    return sys.stderr.isatty() if flag is None else flag


# -- JSON ------------------------------------------------------------------------------------------
# Every JSON file and JSON line the commands write goes through json_dumps: NaN and +-Infinity
# are not JSON (Python's json module writes them anyway, and strict parsers then reject the whole
# file), so non-finite numbers become null.


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, tuples as lists and numpy values
    (anything with ``tolist()``, e.g. arrays and numpy scalars) as plain Python values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return json_safe(obj.tolist())
    return obj


def json_dumps(obj: Any, *, indent: int | None = None, **kw: Any) -> str:
    """``json.dumps`` that always produces valid JSON: NaN/Infinity become ``null``."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, **kw)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as a valid JSON file (see :func:`json_dumps`), atomically: a reader or a
    killed writer never leaves a half-written file (temp file in the same folder + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json_dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def released_by_collectives(*tensors: Any, timeout_s: float = 1.0) -> None:
    """Wait (briefly) until torch.distributed's gloo threads have dropped their references to
    ``tensors`` (torch Tensors just used in a collective).

    A collective's ``wait()`` returns before gloo's worker thread destroys its work object. If
    Python has dropped the tensor by then, that thread's decref needs the GIL, and during
    interpreter shutdown (a rank exiting right after the last broadcast) that aborts the
    process ("terminate called without an active exception": a torchrun rank of the engine, 2
    runs in 12 beside one busy process). Call it after the last collective before exiting."""
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(0)
