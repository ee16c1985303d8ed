"""Fixtures for the models tests."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Seed, and run single-threaded: these tiny models are fastest that way, and intra-op
    threads spin badly when the CPU is shared (the LSTM test went from 0.4 s to 40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
