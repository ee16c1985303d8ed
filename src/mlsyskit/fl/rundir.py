"""The run directory: config, per-round metrics, checkpoints, final model, summary, plot.

Every file is written atomically (temp file + rename) or appended line by line, so a run
killed at any moment leaves a directory that `--resume` can continue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mlsyskit.errors import UserError
from mlsyskit.rundir import (  # noqa: F401 - the shared run-directory parts, re-exported
    CHECKPOINT,
    CONFIG,
    METRICS,
    MODEL,
    SUMMARY,
    append_metrics,
    atomic_write,
    new_run_dir,
    read_json,
    rewrite_metrics,
    save_tensors,
    write_json,
)
from mlsyskit.rundir import read_metrics as _read_metrics

PARTITION = "partition.json"
PLOT = "accuracy.png"


def read_metrics(path: Path, upto_round: int | None = None) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (only rounds <= upto_round when given); a torn last line is ignored."""
    return _read_metrics(path, "round", upto_round)


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
    atomic_write(path / PLOT, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
