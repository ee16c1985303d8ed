import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.vector import IVFPQIndex, knn
from mlsyskit.vector.compat import recall_rate


def test_lossless_codebooks_give_exact_distances():
    # Binary data, one list, one dimension per sub-vector, 2 codewords: every residual
    # sub-vector takes one of two values, which the codebooks hold exactly.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (400, 8)).astype(np.float32)
    x[:, 0] = 1.0
    q = rng.integers(0, 2, (15, 8)).astype(np.float32)
    q[:, 0] = 1.0
    index = IVFPQIndex(8, 1, "l2", m=8, nbits=1)
    index.train(x)
    index.add(x)
    dist, ids = index.search(q, 12, nprobe=1)
    want_d, _ = knn(x, q, 12)
    np.testing.assert_allclose(dist, want_d, atol=1e-4)
    full_d, full_i = knn(x, q, 400)
    true = np.take_along_axis(full_d, np.argsort(full_i, 1), 1)  # distance to every row, by row
    np.testing.assert_allclose(np.take_along_axis(true, ids, 1), dist, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_recall_on_clustered_data_and_save_load(ref, tmp_path, metric):
    x = ref.mixture(3000, 16, 30, seed=1)
    q = ref.mixture(100, 16, 30, seed=2)
    index = IVFPQIndex(16, 16, metric, m=8, nbits=6)
    index.train(x, seed=0)
    index.add(x)
    assert index.ntotal == 3000 and index._codes.nbytes == 3000 * 8  # 8 bytes a vector
    exact = knn(x, q, 10, metric)[1]
    got = index.search(q, 10, nprobe=16)[1]
    assert recall_rate(exact, got) > 0.5  # 8 bytes instead of 64: approximate, far above chance
    path = tmp_path / "pq.idx"
    index.save(path)
    back = IVFPQIndex.load(path)
    assert (back.m, back.nbits, back.ntotal) == (8, 6, 3000)
    for a, b in zip(index.search(q, 10, 4), back.search(q, 10, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    from mlsyskit.vector import IVFIndex

    with pytest.raises(UserError, match="holds a IVFPQ index, not IVFFlat"):
        IVFIndex.load(path)


def test_bad_parameters():
    with pytest.raises(UserError, match="multiple of m"):
        IVFPQIndex(10, 4, m=3)
    with pytest.raises(UserError, match="nbits must be between 1 and 8"):
        IVFPQIndex(8, 4, m=2, nbits=9)
    with pytest.raises(UserError, match="l2 and cosine"):
        IVFPQIndex(8, 4, "dot", m=2)
    index = IVFPQIndex(8, 2, m=2, nbits=8)
    with pytest.raises(UserError, match="at least 2\\^nbits=256"):
        index.train(np.random.default_rng(0).standard_normal((100, 8)))
