import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.vector import IVFIndex, knn
from mlsyskit.vector.compat import recall_rate
from mlsyskit.vector.index_io import MAGIC

METRICS = ["l2", "cosine", "dot", "manhattan"]


def _int_data(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(-4, 5, (n, d)).astype(np.float32)


def _built(x, nlist, metric="l2", backend="torch", ids=None):
    index = IVFIndex(x.shape[1], nlist, metric, backend=backend)
    index.train(x, seed=0)
    index.add(x, ids)
    return index


@pytest.mark.parametrize("metric", METRICS)
def test_probing_every_list_is_exact_knn(backend, metric):
    n = 120 if backend == "triton" else 600
    x = _int_data(n, 6, seed=1)  # integer data: many exact ties, resolved by ascending id
    q = _int_data(12, 6, seed=2)
    index = _built(x, 8, metric, backend)
    dist, ids = index.search(q, 15, nprobe=8)
    want_d, want_i = knn(x, q, 15, metric, backend="numpy")
    if metric == "cosine":  # normalization rounding: compare distances, not tie order
        np.testing.assert_allclose(dist, want_d, atol=1e-5)
    else:
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(dist, want_d, rtol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", ["numpy", "torch"])  # triton shares numpy's list loop
def test_batched_list_scan_with_a_tiny_budget_is_still_exact(backend, metric):
    # Unequal lists, many buckets, and lists too large for the budget (scanned on their own).
    train = _int_data(300, 5, seed=11)
    x = np.concatenate([train, np.repeat(train[:2], 150, axis=0)])  # two rows, 150 copies each
    q = np.concatenate([_int_data(20, 5, seed=13), train[:2]])
    index = IVFIndex(5, 6, metric, backend=backend)
    index.train(train, seed=0)
    index.add(x)
    assert index.list_sizes().max() > 3 * index.list_sizes().min()
    for budget in (4096, 20_000):
        dist, ids = index.search(q, 7, nprobe=6, memory_budget=budget)
        want_d, want_i = knn(x, q, 7, metric, backend="numpy")
        np.testing.assert_allclose(dist, want_d, atol=1e-5)
        if metric != "cosine":
            np.testing.assert_array_equal(ids, want_i)


def test_recall_grows_with_nprobe_and_is_high_on_clustered_data(ref):
    x = ref.mixture(4000, 16, 40, seed=3)
    q = ref.mixture(200, 16, 40, seed=4)
    exact = knn(x, q, 10)[1]
    index = _built(x, 64)
    assert index.list_sizes().sum() == 4000
    recalls = [recall_rate(exact, index.search(q, 10, p)[1]) for p in (1, 2, 4, 8, 64)]
    assert all(a <= b + 1e-12 for a, b in zip(recalls, recalls[1:], strict=False)), recalls
    assert recalls[-1] == 1.0 and recalls[3] > 0.95


def test_custom_ids_batches_and_padding():
    x = _int_data(300, 4, seed=5)
    ids = np.arange(300) * 7 + 1000
    one = _built(x, 6, ids=ids)
    two = IVFIndex(4, 6)
    two.train(x, seed=0)
    two.add(x[:100], ids[:100])
    two.add(x[100:], ids[100:])
    for a, b in zip(one.search(x[:20], 9, 3), two.search(x[:20], 9, 3), strict=True):
        np.testing.assert_array_equal(a, b)
    _, got = one.search(x[:5], 9, 6)
    np.testing.assert_array_equal(got, ids[knn(x, x[:5], 9)[1]])
    # Fewer vectors than k in the probed lists: the missing slots are id -1, distance inf.
    small = _built(ref_rows := np.repeat(np.eye(3, dtype=np.float32) * 10, 5, axis=0), 3)
    dist, got = small.search(ref_rows[:1], 8, nprobe=1)
    assert (got[0, :5] >= 0).all() and (got[0, 5:] == -1).all() and np.isinf(dist[0, 5:]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_save_load_round_trip(tmp_path, metric):
    x = _int_data(400, 5, seed=6)
    index = _built(x, 7, metric, ids=np.arange(400) + 5)
    path = tmp_path / "index.mlskvec"
    index.save(path)
    assert path.read_bytes()[:8] == MAGIC
    back = IVFIndex.load(path)
    assert (back.d, back.nlist, back.metric, back.ntotal) == (5, 7, metric, 400)
    for p in (1, 3, 7):
        for a, b in zip(index.search(x[:10], 6, p), back.search(x[:10], 6, p), strict=True):
            np.testing.assert_array_equal(a, b)


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped byte":
        data[-10] ^= 0xFF
    elif how == "magic":
        data[:8] = b"NOTANIDX"
    elif how == "header":
        data[20:30] = b"\x00" * 10
    elif how == "empty":
        data = b""
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, needle", [
    ("truncated", "does not fit the file"),
    ("flipped byte", "CRC-32"),
    ("magic", "bad magic"),
    ("header", "unreadable header"),
    ("empty", "bad magic"),
])
def test_corrupt_index_file_is_a_user_error(tmp_path, how, needle):
    path = tmp_path / "index.mlskvec"
    _built(_int_data(200, 4, seed=7), 4).save(path)
    _corrupt(path, how)
    with pytest.raises(UserError) as e:
        IVFIndex.load(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        IVFIndex.load(tmp_path / "nope")
    np.save(tmp_path / "x.npy", np.ones((3, 3)))
    with pytest.raises(UserError, match="not an mlsyskit index"):
        IVFIndex.load(tmp_path / "x.npy")


def test_bad_use_is_a_user_error():
    x = _int_data(100, 4, seed=8)
    index = IVFIndex(4, 5)
    with pytest.raises(UserError, match="not trained"):
        index.search(x[:2], 3)
    with pytest.raises(UserError, match="not trained"):
        index.add(x)
    with pytest.raises(UserError, match="at least nlist=5"):
        index.train(x[:4])
    index.train(x)
    index.add(x)
    with pytest.raises(UserError, match="nprobe=6 exceeds nlist=5"):
        index.search(x[:2], 3, nprobe=6)
    with pytest.raises(UserError, match="k=101 exceeds the 100 vectors"):
        index.search(x[:2], 101)
    with pytest.raises(UserError, match="queries has 3 columns but the index has d=4"):
        index.search(np.ones((2, 3)), 3)
    with pytest.raises(UserError, match="ids must be >= 0"):
        index.add(x[:2], ids=[-1, 3])
    with pytest.raises(UserError, match="unknown metric"):
        IVFIndex(4, 5, "jaccard")
    with pytest.raises(UserError, match="nlist must be a positive integer"):
        IVFIndex(4, 0)
