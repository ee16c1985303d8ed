"""Shared test setup: point the product at the real data beside the checkout when present."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path | None:
    """The real data folder (MLSYSKIT_DATA_DIR or ../shared/data), or None when absent."""
    env = os.environ.get("MLSYSKIT_DATA_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    return SHARED if SHARED.is_dir() else None
