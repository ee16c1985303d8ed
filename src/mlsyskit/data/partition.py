"""Splitting a training set across federated clients, IID and non-IID.

Every scheme is deterministic given `seed` (all randomness comes from one
np.random.default_rng(seed)). iid, shards and dirichlet return disjoint parts that cover
every index exactly once; every part is a sorted int64 index array.
"""

from __future__ import annotations

import numpy as np

from mlsyskit.errors import UserError

PARTITIONS = ("iid", "shards", "dirichlet", "natural")
SHARDS_PER_CLIENT = 2
# Dirichlet draws are redone until no client is empty; past this many tries the request
# (alpha, clients) is treated as infeasible rather than looping for ever.
DIRICHLET_MAX_TRIES = 100


def partition(
    labels: np.ndarray | None,
    num_clients: int | None,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    natural: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Split sample indices into per-client index arrays.

    labels: one class label per training sample (needed by shards and dirichlet). iid only
        uses len(labels), so char datasets may pass train_y (or None together with `natural`).
    num_clients: number of parts; for 'natural', None means every natural client.
    scheme: 'iid' (shuffle, near-equal split), 'shards' (McMahan et al. 2017: sort by label,
        2 shards per client), 'dirichlet' (per-class proportions ~ Dir(alpha)), or 'natural'
        (the dataset's own clients, e.g. Shakespeare roles; a seeded subset if fewer asked).
    """
    if scheme not in PARTITIONS:
        raise UserError(f"unknown partition {scheme!r}; use one of {', '.join(PARTITIONS)}")
    if num_clients is not None and num_clients < 1:
        raise UserError(f"--clients must be at least 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    if scheme == "natural":
        return _natural(natural, num_clients, rng)
    if num_clients is None:
        raise UserError(f"partition {scheme!r} needs a number of clients (--clients N)")

    if labels is None:
        if scheme != "iid" or natural is None:
            raise UserError(
                f"partition {scheme!r} needs one class label per sample; this dataset has none "
                "(character data): use iid or natural"
            )
        n = sum(len(part) for part in natural)
    else:
        labels = np.asarray(labels)
        n = len(labels)
    if num_clients > n:
        raise UserError(
            f"--clients {num_clients} exceeds the {n:,} training samples of this dataset; "
            f"use at most {n:,} clients"
        )
    if scheme == "iid":
        return _sorted_parts(np.array_split(rng.permutation(n), num_clients))

    assert labels is not None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"partition {scheme!r} needs one integer class label per sample; this dataset has "
            f"{labels.dtype} labels of shape {labels.shape} (character data): use iid or natural"
        )
    if scheme == "shards":
        return _shards(labels, num_clients, rng)
    return _dirichlet(labels, num_clients, alpha, rng)


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _natural(
    natural: list[np.ndarray] | None, num_clients: int | None, rng: np.random.Generator
) -> list[np.ndarray]:
    if natural is None:
        raise UserError(
            "partition 'natural' needs a dataset with natural clients (shakespeare); "
            "use iid, shards or dirichlet"
        )
    available = len(natural)
    if num_clients is None:
        chosen = np.arange(available)
    elif num_clients > available:
        raise UserError(
            f"--clients {num_clients} exceeds the {available} natural clients of this dataset; "
            f"use at most {available} clients, or omit --clients to use all of them"
        )
    else:
        chosen = np.sort(rng.choice(available, size=num_clients, replace=False))
    return _sorted_parts([natural[i] for i in chosen])


def _shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    n_shards = SHARDS_PER_CLIENT * num_clients
    if n_shards > len(labels):
        raise UserError(
            f"partition 'shards' needs {SHARDS_PER_CLIENT} samples per client: --clients "
            f"{num_clients} with {len(labels):,} samples is too many; use at most "
            f"{len(labels) // SHARDS_PER_CLIENT:,} clients"
        )
    # Stable sort: within a label, shards keep the data's original order (reproducible).
    shards = np.array_split(np.argsort(labels, kind="stable"), n_shards)
    order = rng.permutation(n_shards).reshape(num_clients, SHARDS_PER_CLIENT)
    return _sorted_parts([np.concatenate([shards[s] for s in row]) for row in order])


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    if not np.isfinite(alpha) or alpha <= 0:
        raise UserError(f"dirichlet alpha must be a positive number, got {alpha}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, float(alpha))
    for _ in range(DIRICHLET_MAX_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(concentration)
            if not np.all(np.isfinite(p)) or p.sum() <= 0:
                # Tiny alpha can underflow; its limit puts the whole class on one client.
                p = np.eye(num_clients)[rng.integers(num_clients)]
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) > 0:
            return _sorted_parts(parts)
    raise UserError(
        f"partition 'dirichlet' with alpha={alpha} left some of the {num_clients} clients "
        f"without samples in {DIRICHLET_MAX_TRIES} tries; use a larger alpha or fewer clients"
    )


def partition_stats(
    parts: list[np.ndarray], labels: np.ndarray | None, num_classes: int | None
) -> dict:
    """Per-client sample counts and, when labels are 1-D class labels, label histograms.

    Returns {"sample_counts": [int, ...], "label_histograms": [[int] * num_classes, ...] or None}.
    Pass labels=None for char data (histograms are then None).
    """
    counts = [int(len(p)) for p in parts]
    if labels is None:
        return {"sample_counts": counts, "label_histograms": None}
    labels = np.asarray(labels)
    if labels.ndim != 1:
        return {"sample_counts": counts, "label_histograms": None}
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    histograms = [
        np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes).tolist()
        for p in parts
    ]
    return {"sample_counts": counts, "label_histograms": histograms}
