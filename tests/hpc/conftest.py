"""Fixtures for the hpc tests: mpiexec (the pip mpich wheel's, next to the venv's python)
launched for real, and Triton's interpreter switched on before triton is imported."""

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = False
if HAS_TRITON:
    import torch

    HAS_CUDA = torch.cuda.is_available()
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _mpiexec_path() -> Path:
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.fail("mpiexec is not installed next to this python: `pip install mpi4py mpich` (the Makefile does)")
    return path


def _mpiexec(n: int, args: list[str], timeout: float = 180, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(_mpiexec_path()), "-n", str(n), sys.executable, "-m", "mlsyskit", "hpc", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _mpi_json(n: int, args: list[str], timeout: float = 180) -> dict[str, Any]:
    proc = _mpiexec(n, args, timeout)
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("{") for line in lines) == 1, proc.stdout  # rank 0 alone reports
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def mpi_json() -> Callable[..., dict[str, Any]]:
    """mpi_json(n, args): run `mpiexec -n n python -m mlsyskit hpc ARGS`, parse its last line."""
    return _mpi_json


@pytest.fixture(scope="session")
def mpiexec() -> Callable[..., subprocess.CompletedProcess]:
    return _mpiexec
