"""Shared test setup: point the product at the real data beside the checkout when present."""

import os
from pathlib import Path

import pytest

# Tests check correctness, not speed: one thread per process keeps them fast and stable on a
# shared machine, where torch's multi-threaded small ops can stall badly under contention.
# Set before torch is imported so CLI subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path | None:
    """The real data folder (MLSYSKIT_DATA_DIR or ../shared/data), or None when absent."""
    env = os.environ.get("MLSYSKIT_DATA_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    return SHARED if SHARED.is_dir() else None
