import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.vector import our_ann, our_kmeans, our_knn, recall_rate


def test_our_knn_matches_brute_force_for_one_query_and_a_batch(ref):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((500, 12))  # float64, as the course's harness passes it
    X = rng.standard_normal(12)
    got = our_knn(500, 12, A, X, 7)
    assert got.shape == (7,)
    np.testing.assert_array_equal(got, ref.knn(A, X[None], 7, "l2")[1][0])
    assert our_knn(500, 12, A, A[:3], 7).shape == (3, 7)


def test_our_kmeans_gives_a_cluster_id_per_row(ref):
    A = ref.mixture(600, 8, 4, seed=1, spread=8.0)
    labels = our_kmeans(600, 8, A, 4)
    assert labels.shape == (600,) and set(labels.tolist()) == {0, 1, 2, 3}


def test_our_ann_recall_above_0_9_on_clustered_data(ref):
    A = ref.mixture(4000, 32, 30, seed=2)
    X = ref.mixture(50, 32, 30, seed=3)
    exact, approx = our_knn(4000, 32, A, X, 10), our_ann(4000, 32, A, X, 10)
    assert approx.shape == (50, 10)
    assert recall_rate(exact, approx) > 0.9
    one = our_ann(4000, 32, A, X[0], 10)
    assert one.shape == (10,)


def test_recall_rate():
    assert recall_rate([1, 2, 3, 4], [4, 3, 9, 8]) == 0.5
    assert recall_rate(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [5, 6]])) == 0.5
    with pytest.raises(UserError):
        recall_rate(np.ones((2, 2)), np.ones((3, 2)))


def test_shape_arguments_are_checked():
    A = np.ones((10, 3))
    with pytest.raises(UserError, match=r"A has shape \(10, 3\) but N=10, D=4"):
        our_knn(10, 4, A, np.ones(4), 2)
    with pytest.raises(UserError, match="X has 2 columns but A has d=3"):
        our_knn(10, 3, A, np.ones(2), 2)
    with pytest.raises(UserError, match="k=11 exceeds"):
        our_ann(10, 3, A, np.ones(3), 11)
