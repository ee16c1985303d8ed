"""The parts every run directory shares (`mlsyskit fedavg`, `fl server`, `train`): atomic files,
JSON, and ``metrics.jsonl`` appended one fsynced line per row.

Every file is written atomically (temp file + rename) or appended line by line, so a run killed
at any moment leaves a directory that ``--resume`` can continue. What each run stores in its
checkpoint stays with its own package (``fl.rundir``, ``train.rundir``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsyskit.errors import UserError
from mlsyskit.runtime import json_dumps

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Valid JSON (NaN/Infinity written as null), atomically."""
    atomic_write(path, lambda p: p.write_text(json_dumps(obj, indent=2) + "\n"))


def read_json(path: Path, missing: str | None = None) -> dict[str, Any]:
    """A JSON file of the run directory: {} if it is missing, or a UserError saying ``missing``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if missing is None:
            return {}
        raise UserError(missing) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """A safetensors file (no pickle), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def new_run_dir(path: Path) -> Path:
    """Create a fresh run directory; refuse one that already holds a run (never overwrite it)."""
    if (path / METRICS).exists() or (path / CONFIG).exists():
        raise UserError(f"{path} already holds a run; continue it with --resume {path} or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run directory --out {path}: {e.strerror or e}") from None
    return path


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One row of metrics.jsonl, on disk (fsynced) before this returns."""
    with open(path / METRICS, "a") as f:
        f.write(json_dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path, key: str, upto: int | None = None) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (only those with ``row[key] <= upto`` when given); a torn last line
    is ignored."""
    rows = []
    if not (path / METRICS).exists():
        return rows
    for line in (path / METRICS).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if upto is None or row[key] <= upto:
            rows.append(row)
    return rows


def rewrite_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with ``rows`` (resume drops rows past the checkpoint), atomically."""
    text = "".join(json_dumps(r) + "\n" for r in rows)
    atomic_write(path / METRICS, lambda p: p.write_text(text))
