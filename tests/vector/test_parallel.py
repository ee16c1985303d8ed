"""The torch back end's thread pool (tests run with one torch thread otherwise)."""

import numpy as np
import pytest
import torch

from mlsyskit.vector import IVFIndex, kmeans, knn


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot", "manhattan"])
def test_pool_results_equal_serial_results(ref, two_threads, metric):
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, (3000, 6)).astype(np.float32)
    q = rng.integers(-3, 4, (300, 6)).astype(np.float32)
    got = knn(base, q, 12, metric, memory_budget=1 << 16)  # many blocks, spread over 2 threads
    assert torch.get_num_threads() == 2  # restored after the call
    want = knn(base, q, 12, metric, backend="numpy")
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    if metric != "cosine":
        np.testing.assert_array_equal(got[1], want[1])
    index = IVFIndex(6, 16, metric)
    index.train(base, seed=0)
    index.add(base)
    d_all, i_all = index.search(q, 12, nprobe=16)
    np.testing.assert_allclose(d_all, want[0], atol=1e-5)
    x = ref.mixture(2000, 5, 6, seed=1)
    a = kmeans(x, 6, "l2" if metric != "cosine" else "cosine", seed=0)
    b = kmeans(x, 6, "l2" if metric != "cosine" else "cosine", seed=0, backend="numpy")
    np.testing.assert_array_equal(a.labels, b.labels)
