"""Inputs and outputs of the Spark pipelines: paths checked before the JVM starts, Spark's
path errors turned into one clear line, output folders."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError


def local_path(uri: str) -> Path | None:
    """The local path of ``uri`` (a plain path or ``file:``), None for other schemes (hdfs://...)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("file:"):
        return Path(uri[len("file:"):])
    if "://" in uri:
        return None
    return Path(uri).expanduser()


def check_input(uri: str, flag: str, *, allow_dir: bool = True, allow_file: bool = True) -> str:
    """For a local path: it exists, is readable and holds data (one clear UserError otherwise);
    returns an absolute path. Other URIs (hdfs://, s3a://) are left to Spark."""
    if not uri or not str(uri).strip():
        raise UserError(f"{flag} is empty: give a path")
    path = local_path(uri)
    if path is None:
        return uri
    if not path.exists():
        raise UserError(f"{flag} {uri}: no such file or directory")
    if path.is_dir():
        if not allow_dir:
            raise UserError(f"{flag} {uri} is a directory; give a file")
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError(f"{flag} {uri}: permission denied")
        if not any(f.is_file() and f.stat().st_size > 0 for f in path.rglob("*") if not f.name.startswith((".", "_"))):
            raise UserError(f"{flag} {uri}: the directory holds no non-empty file")
    else:
        if not allow_file:
            raise UserError(f"{flag} {uri} is a file; give a directory")
        if not os.access(path, os.R_OK):
            raise UserError(f"{flag} {uri}: permission denied")
        if path.stat().st_size == 0:
            raise UserError(f"{flag} {uri}: the file is empty")
    return str(path.resolve())


def prepare_out(out: str | Path) -> Path:
    """Create the output folder (a clear error if it cannot be)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--out {out}: permission denied")
    return path.resolve()


def write_json(path: Path, obj: Any) -> None:
    """Valid JSON (NaN as null), UTF-8 text kept readable, written atomically."""
    from mlsyskit.runtime import json_dumps

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def spark_errors(what: str) -> Iterator[None]:
    """Spark's analysis errors (a path that does not exist, a column that is not there) as one
    UserError line; other failures are bugs or cluster faults and propagate."""
    try:
        from pyspark.errors import AnalysisException
    except ImportError:  # pragma: no cover - pyspark is a dependency
        yield
        return
    try:
        yield
    except AnalysisException as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: {msg}") from None
