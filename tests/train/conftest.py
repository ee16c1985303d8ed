"""Fixtures for the training tests: torchrun launched for real, run directories compared."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

TIMING = {"samples_per_s", "epoch_s", "elapsed_s", "peak_mem_mb", "world_size"}


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> dict[str, Any]:
    """`torchrun --standalone --nproc-per-node N -m mlsyskit train ARGS`; its last JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mlsyskit", "train", *args, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    # only rank 0 reports: one JSON line
    assert sum(line.startswith("{") for line in lines) == 1, proc.stdout
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., dict[str, Any]]:
    return _torchrun


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


def _rows(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


class Compare:
    max_diff = staticmethod(_max_diff)
    rows = staticmethod(_rows)

    @staticmethod
    def models_equal(a: Path, b: Path) -> bool:
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="session")
def compare() -> type[Compare]:
    return Compare
