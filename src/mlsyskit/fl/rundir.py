"""The run directory: config, per-round metrics, checkpoints, final model, summary, plot.

Every file is written atomically (temp file + rename) or appended line by line, so a run
killed at any moment leaves a directory that `--resume` can continue.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mlsyskit.errors import UserError
from mlsyskit.runtime import json_dumps

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
PARTITION = "partition.json"
PLOT = "accuracy.png"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Valid JSON (NaN/Infinity written as null), atomically."""
    _atomic_write(path, lambda p: p.write_text(json_dumps(obj, indent=2) + "\n"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the run directory ({} if it is missing)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def new_run_dir(path: Path) -> Path:
    """Create a fresh run directory; refuse one that already holds a run (never overwrite it)."""
    if (path / METRICS).exists() or (path / CONFIG).exists():
        raise UserError(
            f"{path} already holds a run; continue it with --resume {path} or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run directory --out {path}: {e.strerror or e}") from None
    return path


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path / METRICS, "a") as f:
        f.write(json_dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path, upto_round: int | None = None) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (only rounds <= upto_round when given); a torn last line is ignored."""
    rows = []
    if not (path / METRICS).exists():
        return rows
    for line in (path / METRICS).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if upto_round is None or row["round"] <= upto_round:
            rows.append(row)
    return rows


def rewrite_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json_dumps(r) + "\n" for r in rows)
    _atomic_write(path / METRICS, lambda p: p.write_text(text))


def save_checkpoint(path: Path, rnd: int, global_w: torch.Tensor, server_state: dict[str, torch.Tensor]) -> None:
    tensors = {"global": global_w, **{f"server.{k}": v for k, v in server_state.items()}}
    save_tensors(path / CHECKPOINT, tensors, {"round": str(rnd)})


def load_checkpoint(path: Path) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """(round, global model, server state) of the last checkpoint; round 0 if none was written."""
    ckpt = path / CHECKPOINT
    if not ckpt.exists():
        return 0, torch.empty(0), {}
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt), framework="pt") as f:
            rnd = int(f.metadata()["round"])
        tensors = load_file(str(ckpt))
    except Exception as e:  # noqa: BLE001 - any corruption becomes one clear line
        raise UserError(f"checkpoint {ckpt} is unreadable ({e}); start a new run") from None
    state = {k.removeprefix("server."): v for k, v in tensors.items() if k.startswith("server.")}
    return rnd, tensors["global"], state


def accuracy_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The matplotlib figure of accuracy.png: test accuracy per evaluated round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pts = [(r["round"], r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot(*zip(*pts, strict=True), marker=".")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_accuracy(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Write accuracy.png (see :func:`accuracy_figure`)."""
    import matplotlib.pyplot as plt

    fig = accuracy_figure(rows, title)
    _atomic_write(path / PLOT, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
