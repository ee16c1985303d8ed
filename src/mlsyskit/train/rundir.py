"""The run directory of `mlsyskit train`: config.json, metrics.jsonl (one row per epoch),
summary.json, model.safetensors and checkpoint.safetensors (written by rank 0 only).

Files are written atomically (temp file + rename) or appended line by line, so a run killed at
any moment leaves a directory that ``--resume`` continues. The checkpoint holds no pickle:
tensors (model, optimizer state, RNG) in safetensors, everything else as JSON metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlsyskit.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: is {path.parent} a run directory of mlsyskit train?") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


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
    with open(path / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (epochs <= upto_epoch when given); a torn last line is ignored."""
    rows = []
    if (path / METRICS).exists():
        for line in (path / METRICS).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if upto_epoch is None or row["epoch"] <= upto_epoch:
                rows.append(row)
    return rows


def rewrite_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    _atomic(path / METRICS, lambda p: p.write_text(text))


def save_model(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                    meta: dict[str, Any]) -> None:
    """model.* and optim.<param>.<key> tensors, the torch RNG; the optimizer's param groups,
    its non-tensor state and ``meta`` (position, scaler, running loss) as JSON."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    scalars: dict[str, Any] = {}
    for pid, st in optim_state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "optim_param_groups": optim_state["param_groups"], "optim_scalars": scalars}
    save_model(path / CHECKPOINT, tensors, {"meta": json.dumps(meta)})


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
    """(model state, optimizer state dict, meta) of the last checkpoint, None when there is none."""
    ckpt = path / CHECKPOINT
    if not ckpt.exists():
        return None
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - any corruption becomes one clear line
        raise UserError(f"checkpoint {ckpt} is unreadable ({e}); start a new run") from None
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in meta.pop("optim_scalars").items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    optim = {"state": state, "param_groups": meta.pop("optim_param_groups")}
    meta["rng_torch"] = tensors.get("rng.torch")
    return model, optim, meta
