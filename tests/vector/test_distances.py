import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.vector import distance, pairwise_distances

METRICS = ["l2", "cosine", "dot", "manhattan"]


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_matches_the_formula(backend, metric, ref):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((7, 19)).astype(np.float32)
    b = rng.standard_normal((45, 19)).astype(np.float32)
    q[2] = 0.0  # zero vectors: cosine distance 1 by convention
    b[5] = 0.0
    got = pairwise_distances(q, b, metric, backend=backend)
    assert got.shape == (7, 45) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.distances(q, b, metric), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_single_pair_matches_the_formula(metric, ref):
    x, y = np.array([1.0, -2.0, 3.0]), np.array([0.5, 4.0, -1.0])
    want = ref.distances(x[None], y[None], metric)[0, 0]
    assert distance(x, y, metric) == pytest.approx(want, rel=1e-6)


def test_known_values_and_zero_vector_convention():
    assert distance([3, 0], [0, 4], "l2") == pytest.approx(5.0)
    assert distance([3, 0], [0, 4], "manhattan") == pytest.approx(7.0)
    assert distance([1, 2], [3, 4], "dot") == pytest.approx(-11.0)
    assert distance([1, 0], [-1, 0], "cosine") == pytest.approx(2.0)
    assert distance([1, 1], [2, 2], "cosine") == pytest.approx(0.0, abs=1e-12)
    assert distance([0, 0], [1, 2], "cosine") == 1.0
    assert distance([0, 0], [0, 0], "cosine") == 1.0
    assert distance([1, 2], [2, 3], "euclidean") == distance([1, 2], [2, 3], "l2")  # alias


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: distance([1, 2], [1, 2, 3]), "equal length"),
        (lambda: distance([1, 2], [1, 2], "hamming"), "unknown metric 'hamming'"),
        (lambda: pairwise_distances(np.ones((2, 5)), np.ones((4, 3))), "queries has 5 columns but the base has d=3"),
        (lambda: pairwise_distances(np.ones((2, 3)), np.ones((4, 3)), backend="cupy"), "unknown backend 'cupy'"),
        (lambda: pairwise_distances(np.ones((2, 3), complex), np.ones((4, 3))), "dtype complex128"),
        (lambda: pairwise_distances(np.ones((2, 3)), np.array([["a", "b", "c"]])), "dtype <U1"),
        (lambda: pairwise_distances(np.ones((2, 3)), np.full((4, 3), np.nan)), "NaN"),
        (lambda: pairwise_distances(np.ones((2, 3)), np.ones((4, 3, 1))), "shape (n, d)"),
    ],
)
def test_bad_input_is_a_user_error(call, needle):
    with pytest.raises(UserError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)
