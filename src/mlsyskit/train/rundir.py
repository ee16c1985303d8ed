"""The run directory of `mlsyskit train`: config.json, metrics.jsonl (one row per epoch),
summary.json, model.safetensors and checkpoint.safetensors (written by rank 0 only).

Files are written atomically (temp file + rename) or appended line by line, so a run killed at
any moment leaves a directory that ``--resume`` continues. The checkpoint holds no pickle:
tensors (model, optimizer state, RNG) in safetensors, everything else as JSON metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlsyskit.errors import UserError
from mlsyskit.rundir import (  # noqa: F401 - the shared run-directory parts, re-exported
    CHECKPOINT,
    CONFIG,
    METRICS,
    MODEL,
    SUMMARY,
    append_metrics,
    new_run_dir,
    rewrite_metrics,
    save_tensors,
    write_json,
)
from mlsyskit.rundir import read_json as _read_json
from mlsyskit.rundir import read_metrics as _read_metrics


def read_json(path: Path) -> dict[str, Any]:
    return _read_json(path, missing=f"{path} is missing: is {path.parent} a run directory of mlsyskit train?")


def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (epochs <= upto_epoch when given); a torn last line is ignored."""
    return _read_metrics(path, "epoch", upto_epoch)


def save_model(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    save_tensors(path, state, meta)


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
