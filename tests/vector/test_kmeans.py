import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlsyskit.errors import UserError
from mlsyskit.vector import kmeans

_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _inertia(x, centroids, labels, metric):
    if metric == "l2":
        return float(((x.astype(np.float64) - centroids[labels]) ** 2).sum())
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return float((1.0 - (unit * centroids[labels]).sum(1)).sum())


def _check_run(ref, x, k, metric, backend, seed, init):
    r = kmeans(x, k, metric, max_iter=30, tol=0.0, seed=seed, init=init, backend=backend)
    h = np.array(r.inertia_history)
    assert len(h) == r.n_iter + 1
    # Never increases (up to float32 rounding of the centroid update).
    assert np.all(h[1:] <= h[:-1] * (1 + 1e-5) + 1e-4), h
    assert r.labels.shape == (len(x),) and r.centroids.shape == (k, x.shape[1])
    assert r.inertia == pytest.approx(_inertia(x, r.centroids, r.labels, metric), rel=1e-4, abs=1e-3)
    # Every point sits with its nearest centroid.
    dist = ref.distances(x, r.centroids, "l2" if metric == "l2" else "cosine")
    best = dist.min(1)
    assert np.all(dist[np.arange(len(x)), r.labels] <= best + 1e-4)
    if metric == "cosine":
        nonzero = np.linalg.norm(r.centroids, axis=1) > 0
        np.testing.assert_allclose(np.linalg.norm(r.centroids[nonzero], axis=1), 1.0, rtol=1e-5)
    return r


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@_SETTINGS
@given(n=st.integers(2, 80), d=st.integers(1, 5), centers=st.integers(1, 6), seed=st.integers(0, 10**6),
       init=st.sampled_from(["k-means++", "random"]), kfrac=st.floats(0.05, 1.0))
def test_inertia_never_increases(ref, metric, n, d, centers, seed, init, kfrac):
    x = ref.mixture(n, d, centers, seed=seed)
    k = max(1, int(kfrac * min(n, 12)))
    for backend in ("numpy", "torch"):
        _check_run(ref, x, k, metric, backend, seed, init)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_triton_assignment_step(ref, metric):
    pytest.importorskip("triton")
    x = ref.mixture(70, 6, 4, seed=2)
    r = _check_run(ref, x, 4, metric, "triton", 0, "random")
    t = kmeans(x, 4, metric, max_iter=30, tol=0.0, seed=0, init="random", backend="torch")
    np.testing.assert_array_equal(r.labels, t.labels)
    np.testing.assert_allclose(r.centroids, t.centroids, rtol=1e-5, atol=1e-5)


def test_back_ends_agree_on_separated_blobs(ref, backend):
    x = ref.mixture(90, 4, 3, seed=5, spread=10.0)
    r = kmeans(x, 3, seed=1, backend=backend)
    want = kmeans(x, 3, seed=1, backend="numpy")
    np.testing.assert_array_equal(r.labels, want.labels)
    assert r.converged and r.n_iter < 100
    assert len(np.unique(r.labels)) == 3


def test_empty_cluster_is_reseeded_with_the_farthest_point(backend):
    x = np.array([[0.0], [0.2], [0.1], [10.0], [10.2], [30.0]], np.float32)
    init = np.array([[0.0], [0.0], [100.0]], np.float32)  # centroid 1 ties with 0 and loses: empty
    r = kmeans(x, 3, init=init, max_iter=10, backend=backend)
    assert r.n_reseeded >= 1
    assert sorted(np.bincount(r.labels, minlength=3)) == [1, 2, 3]
    assert r.inertia == pytest.approx(0.02 + 0.02, abs=1e-4)  # {0, .1, .2}, {10, 10.2}, {30}


def test_zero_rows_under_cosine(backend):
    x = np.array([[1, 0], [2, 0.1], [0, 0], [0, 3], [0.1, 2]], np.float32)
    r = kmeans(x, 2, "cosine", init="random", seed=0, backend=backend)
    assert r.labels[0] == r.labels[1] != r.labels[3] == r.labels[4]
    assert r.inertia == pytest.approx(1.0 + _inertia(np.delete(x, 2, 0), r.centroids, np.delete(r.labels, 2), "cosine"), abs=1e-5)


def test_convergence_is_reported_and_runs_are_deterministic(ref):
    x = ref.mixture(300, 8, 5, seed=9)
    a, b = kmeans(x, 5, seed=3), kmeans(x, 5, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.converged
    short = kmeans(x, 40, max_iter=1, tol=0.0, seed=3)
    assert short.n_iter == 1 and not short.converged


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"k": 11}, "k=11 clusters need at least 11 points"),
        ({"k": 0}, "k must be a positive integer"),
        ({"metric": "dot"}, "unknown metric 'dot'"),
        ({"init": "forgy"}, "unknown init 'forgy'"),
        ({"init": np.zeros((2, 3))}, "init centroids has 3 columns"),
        ({"max_iter": -1}, "max_iter must be a non-negative integer"),
        ({"tol": -1.0}, "tol must be >= 0"),
        ({"x": np.ones((10, 2), complex)}, "dtype complex128"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, needle):
    args = {"x": np.random.default_rng(0).standard_normal((10, 2)), "k": 3, **kwargs}
    with pytest.raises(UserError) as e:
        kmeans(**args)
    assert needle in str(e.value)
