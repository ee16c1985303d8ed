import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mlsyskit.errors import UserError
from mlsyskit.vector import knn

METRICS = ["l2", "cosine", "dot", "manhattan"]
# Small integers make every l2/dot/manhattan score exact in float32 and produce many ties
# (duplicates, equal distances), so the expected order, ties by ascending index, is exact.
EXACT = ["l2", "dot", "manhattan"]


@st.composite
def problems(draw, max_n=40, max_d=6):
    d = draw(st.integers(1, max_d))
    n = draw(st.integers(1, max_n))
    q = draw(st.integers(1, 5))
    ints = st.integers(-3, 3)
    base = draw(arrays(np.int8, (n, d), elements=ints)).astype(np.float32)
    queries = draw(arrays(np.int8, (q, d), elements=ints)).astype(np.float32)
    k = draw(st.integers(1, n))
    return base, queries, k


def _check_against_brute_force(ref, base, queries, k, metric, backend, **kw):
    dist, idx = knn(base, queries, k, metric, backend=backend, **kw)
    want_d, want_i = ref.knn(base, queries, k, metric)
    assert dist.shape == idx.shape == (len(queries), k)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    if metric in EXACT:
        np.testing.assert_array_equal(idx, want_i)
        np.testing.assert_array_equal(dist, want_d.astype(np.float32))
    else:
        # Cosine normalizes in float32: compare distances, and check that each returned index
        # really has the distance reported for it.
        np.testing.assert_allclose(dist, want_d, atol=1e-5)
        full = ref.distances(queries, base, metric)
        np.testing.assert_allclose(np.take_along_axis(full, idx, 1), dist, atol=1e-5)
        assert all(len(set(row)) == k for row in idx)


@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_knn_equals_brute_force(ref, metric, problem):
    for backend in ("numpy", "torch"):
        _check_against_brute_force(ref, *problem, metric, backend)


@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(max_n=24, max_d=4))
def test_triton_knn_equals_brute_force(ref, metric, problem):
    pytest.importorskip("triton")
    _check_against_brute_force(ref, *problem, metric, "triton")


@pytest.mark.parametrize("metric", METRICS)
def test_chunked_search_equals_one_chunk_with_ties_across_chunks(ref, backend, metric):
    # Every base row appears 3 times, far apart: equal distances fall in different chunks,
    # and the tiny memory budget forces many chunks of both base and queries.
    rng = np.random.default_rng(3)
    n = 300 if backend == "triton" else 700
    rows = rng.integers(-2, 3, (n // 3, 5)).astype(np.float32)
    base = np.concatenate([rows, rows, rows])
    queries = rng.integers(-2, 3, (9, 5)).astype(np.float32)
    _check_against_brute_force(ref, base, queries, 20, metric, backend, memory_budget=4096)


def test_k_equals_n_returns_every_row_sorted(ref, backend):
    rng = np.random.default_rng(4)
    base = rng.integers(-2, 3, (30, 3)).astype(np.float32)
    dist, idx = knn(base, base[:4], 30, "l2", backend=backend)
    assert sorted(idx[0]) == list(range(30))
    assert np.all(np.diff(dist, axis=1) >= 0)
    np.testing.assert_array_equal(idx, ref.knn(base, base[:4], 30, "l2")[1])


def test_duplicates_are_ordered_by_index(backend):
    base = np.array([[1, 1], [0, 0], [1, 1], [5, 5], [1, 1], [0, 0]], np.float32)
    dist, idx = knn(base, np.array([[1, 1]], np.float32), 4, "l2", backend=backend)
    assert idx.tolist() == [[0, 2, 4, 1]]
    assert dist[0, :3].tolist() == [0.0, 0.0, 0.0]


def test_zero_vectors_under_cosine_have_distance_one(backend):
    base = np.array([[1, 0], [0, 0], [0, 2], [-1, 0]], np.float32)
    dist, idx = knn(base, np.zeros((1, 2), np.float32), 4, "cosine", backend=backend)
    assert idx.tolist() == [[0, 1, 2, 3]]  # everything ties at 1: ascending index
    np.testing.assert_allclose(dist, 1.0)
    dist, idx = knn(base, np.array([[2, 0]], np.float32), 4, "cosine", backend=backend)
    assert idx.tolist() == [[0, 1, 2, 3]]
    np.testing.assert_allclose(dist, [[0.0, 1.0, 1.0, 2.0]], atol=1e-6)


def test_shapes_of_the_result():
    base = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    d, i = knn(base, base[3], 5)  # one 1-D query counts as Q = 1
    assert d.shape == i.shape == (1, 5) and i[0, 0] == 3 and d[0, 0] < 1e-3
    d, i = knn(base, np.empty((0, 8), np.float32), 5)
    assert d.shape == i.shape == (0, 5)
    d, i = knn(base.astype(np.float64), base[:2].astype(np.int64), 2)  # converted to float32
    assert i.shape == (2, 2)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"k": 51}, "k=51 exceeds the 50 base vectors"),
        ({"k": 0}, "k must be at least 1"),
        ({"k": 2.5}, "k must be an integer"),
        ({"metric": "hamming"}, "unknown metric"),
        ({"backend": "jax"}, "unknown backend"),
        ({"queries": np.ones((2, 7))}, "queries has 7 columns but the base has d=8"),
        ({"queries": np.ones((2, 8), dtype=bool)}, "dtype bool"),
        ({"base": np.ones((0, 8))}, "exceeds the 0 base vectors"),
        ({"base": np.full((50, 8), np.inf)}, "NaN or infinite"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, needle):
    args = {"base": np.ones((50, 8), np.float32), "queries": np.ones((2, 8)), "k": 3, **kwargs}
    with pytest.raises(UserError) as e:
        knn(**args)
    assert needle in str(e.value)
