"""Fixtures for the vector tests; every back end runs the same tests.

Without a CUDA GPU the Triton kernels run under Triton's interpreter, which must be switched
on before triton is first imported: done here, at collection, before any test imports it.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = [
    "numpy",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
]
METRICS = ["l2", "cosine", "dot", "manhattan"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each back end in turn (triton under the interpreter when there is no GPU)."""
    return request.param


class Reference:
    """Helpers the tests share (with --import-mode=importlib they cannot import conftest)."""

    @staticmethod
    def distances(q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
        return reference_distances(q, b, metric)

    @staticmethod
    def knn(b: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        return brute_force_knn(b, q, k, metric)

    @staticmethod
    def mixture(n: int, d: int, centers: int, seed: int = 0, spread: float = 4.0) -> np.ndarray:
        return gaussian_mixture(n, d, centers, seed, spread)


@pytest.fixture(scope="session")
def ref() -> type[Reference]:
    return Reference


def reference_distances(q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Distances straight from the formulas, in float64, one pair at a time."""
    q, b = q.astype(np.float64), b.astype(np.float64)
    out = np.empty((len(q), len(b)))
    for i, x in enumerate(q):
        for j, y in enumerate(b):
            if metric == "l2":
                out[i, j] = np.sqrt(np.sum((x - y) ** 2))
            elif metric == "manhattan":
                out[i, j] = np.sum(np.abs(x - y))
            elif metric == "dot":
                out[i, j] = -np.dot(x, y)
            else:
                nx, ny = np.linalg.norm(x), np.linalg.norm(y)
                out[i, j] = 1.0 if nx == 0 or ny == 0 else 1.0 - np.dot(x, y) / (nx * ny)
    return out


def brute_force_knn(b: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Sort every row of the reference distance matrix by (distance, index)."""
    dist = reference_distances(q, b, metric)
    idx = np.lexsort((np.broadcast_to(np.arange(len(b)), dist.shape), dist), axis=-1)[:, :k]
    return np.take_along_axis(dist, idx, 1), idx


def gaussian_mixture(n: int, d: int, centers: int, seed: int = 0, spread: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)) * spread
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)
