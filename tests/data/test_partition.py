"""Partitioners: coverage, determinism, non-IID structure, and the user errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsyskit.data import PARTITIONS, partition, partition_stats
from mlsyskit.errors import UserError

MNIST_5K_LABELS = np.repeat(np.arange(10), 500)  # the layout of mnist_5k.csv: sorted by class


@st.composite
def labelled_problem(draw, min_per_client: int = 1):
    labels = np.array(draw(st.lists(st.integers(0, 9), min_size=min_per_client, max_size=300)))
    clients = draw(st.integers(1, min(40, len(labels) // min_per_client)))
    return labels, clients, draw(st.integers(0, 2**32 - 1))


def _assert_exact_cover(parts: list[np.ndarray], n: int, clients: int) -> None:
    assert len(parts) == clients
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(labelled_problem())
def test_iid_property(problem) -> None:
    labels, clients, seed = problem
    parts = partition(labels, clients, "iid", seed=seed)
    _assert_exact_cover(parts, len(labels), clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = partition(labels, clients, "iid", seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(labelled_problem(min_per_client=2))
def test_shards_property(problem) -> None:
    labels, clients, seed = problem
    parts = partition(labels, clients, "shards", seed=seed)
    _assert_exact_cover(parts, len(labels), clients)
    again = partition(labels, clients, "shards", seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # What is guaranteed in general: each client holds 2 shards, i.e. at most 2 contiguous
    # runs of the label-sorted order, with the sizes np.array_split gives.
    rank = np.empty(len(labels), dtype=np.int64)
    rank[np.argsort(labels, kind="stable")] = np.arange(len(labels))
    shard_sizes = sorted(len(s) for s in np.array_split(np.arange(len(labels)), 2 * clients))
    for p in parts:
        positions = np.sort(rank[p])
        assert 1 + np.count_nonzero(np.diff(positions) > 1) <= 2
        assert min(shard_sizes) * 2 <= len(p) <= max(shard_sizes) * 2


@pytest.mark.parametrize("clients", [100, 50, 10])
def test_shards_on_sorted_5k_give_at_most_two_labels(clients: int) -> None:
    # 500 per class and shard sizes dividing 500: no shard straddles a class boundary.
    parts = partition(MNIST_5K_LABELS, clients, "shards", seed=3)
    hist = partition_stats(parts, MNIST_5K_LABELS, 10)["label_histograms"]
    assert all(sum(1 for c in h if c) <= 2 for h in hist)
    assert sum(1 for h in hist if sum(1 for c in h if c) == 2) > clients // 2  # mostly 2 labels


@settings(max_examples=60, deadline=None)
@given(labelled_problem(), st.sampled_from([0.05, 0.5, 1.0, 100.0]))
def test_dirichlet_property(problem, alpha: float) -> None:
    labels, clients, seed = problem
    try:
        parts = partition(labels, clients, "dirichlet", seed=seed, alpha=alpha)
    except UserError as err:  # infeasible draws are allowed, but must say what to change
        assert "larger alpha or fewer clients" in str(err)
        return
    _assert_exact_cover(parts, len(labels), clients)
    again = partition(labels, clients, "dirichlet", seed=seed, alpha=alpha)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _mean_max_label_fraction(alpha: float) -> float:
    fractions = []
    for seed in range(5):
        parts = partition(MNIST_5K_LABELS, 10, "dirichlet", seed=seed, alpha=alpha)
        hist = np.array(partition_stats(parts, MNIST_5K_LABELS, 10)["label_histograms"])
        fractions.extend(hist.max(axis=1) / hist.sum(axis=1))
    return float(np.mean(fractions))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    skewed, mild, near_iid = (_mean_max_label_fraction(a) for a in (0.1, 1.0, 1000.0))
    assert skewed > mild > near_iid
    assert skewed > 0.5 and near_iid < 0.15


def test_seed_changes_the_split() -> None:
    for scheme in ("iid", "shards", "dirichlet"):
        a = partition(MNIST_5K_LABELS, 20, scheme, seed=0)
        b = partition(MNIST_5K_LABELS, 20, scheme, seed=1)
        assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


NATURAL = [np.arange(0, 3), np.arange(3, 10), np.arange(10, 11), np.arange(11, 20)]


def test_natural() -> None:
    parts = partition(None, None, "natural", seed=0, natural=NATURAL)
    assert [p.tolist() for p in parts] == [p.tolist() for p in NATURAL]
    subset = partition(None, 2, "natural", seed=7, natural=NATURAL)
    again = partition(None, 2, "natural", seed=7, natural=NATURAL)
    assert all(np.array_equal(a, b) for a, b in zip(subset, again, strict=True))
    chosen = [next(i for i, n in enumerate(NATURAL) if np.array_equal(n, p)) for p in subset]
    assert len(chosen) == 2 and chosen == sorted(chosen)
    seen = {
        tuple(len(p) for p in partition(None, 2, "natural", seed=s, natural=NATURAL))
        for s in range(20)
    }
    assert len(seen) > 1  # the subset depends on the seed
    with pytest.raises(UserError, match="exceeds the 4 natural clients"):
        partition(None, 5, "natural", seed=0, natural=NATURAL)


def test_iid_for_char_data_uses_natural_size() -> None:
    parts = partition(None, 3, "iid", seed=0, natural=NATURAL)
    _assert_exact_cover(parts, 20, 3)
    char_targets = np.zeros((20, 80), dtype=np.int64)  # train_y of char data: only len is used
    _assert_exact_cover(partition(char_targets, 4, "iid", seed=0), 20, 4)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (MNIST_5K_LABELS, 5, "random"),
            {},
            "unknown partition 'random'; use one of iid, shards, dirichlet, natural",
        ),
        (
            (None, 5, "natural"),
            {},
            "partition 'natural' needs a dataset with natural clients (shakespeare); use iid, shards or dirichlet",
        ),
        ((MNIST_5K_LABELS, 0, "iid"), {}, "--clients must be at least 1"),
        ((MNIST_5K_LABELS, -2, "natural"), {"natural": NATURAL}, "--clients must be at least 1"),
        ((MNIST_5K_LABELS, None, "iid"), {}, "needs a number of clients"),
        (
            (np.zeros(7, np.int64), 8, "iid"),
            {},
            "--clients 8 exceeds the 7 training samples of this dataset; use at most 7 clients",
        ),
        ((np.zeros(7, np.int64), 8, "dirichlet"), {}, "use at most 7 clients"),
        ((np.zeros(7, np.int64), 4, "shards"), {}, "use at most 3 clients"),
        ((None, 2, "shards"), {"natural": NATURAL}, "needs one class label per sample"),
        ((None, 2, "dirichlet"), {}, "needs one class label per sample"),
        ((None, 2, "iid"), {}, "needs one class label per sample"),
        (
            (np.zeros((20, 80), np.int64), 2, "shards"),
            {},
            "needs one integer class label per sample",
        ),
        ((MNIST_5K_LABELS, 2, "dirichlet"), {"alpha": 0.0}, "alpha must be a positive number"),
        (
            (np.zeros(3, np.int64), 3, "dirichlet"),
            {"alpha": 0.001},
            "use a larger alpha or fewer clients",
        ),
    ],
)
def test_user_errors(args, kwargs, message: str) -> None:
    with pytest.raises(UserError) as err:
        partition(*args, seed=0, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_partition_stats() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    assert partition_stats(parts, labels, 4) == {
        "sample_counts": [2, 4],
        "label_histograms": [[1, 1, 0, 0], [1, 0, 3, 0]],
    }
    assert partition_stats(parts, labels, None)["label_histograms"][1] == [1, 0, 3]
    assert partition_stats(parts, None, None) == {"sample_counts": [2, 4], "label_histograms": None}
    assert PARTITIONS == ("iid", "shards", "dirichlet", "natural")
