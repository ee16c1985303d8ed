"""Input checks shared by the vector API: every bad input becomes one clear UserError."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlsyskit.errors import UserError

METRICS = ("l2", "cosine", "dot", "manhattan")
_METRIC_ALIASES = {"euclidean": "l2", "ip": "dot", "inner_product": "dot", "l1": "manhattan"}
BACKENDS = ("numpy", "torch", "triton")

# Finite check in slices so a 2 GiB base does not need a 512 MiB boolean temporary.
_FINITE_CHECK_ROWS = 1 << 16


def check_metric(metric: str, allowed: tuple[str, ...] = METRICS) -> str:
    """The canonical metric name; aliases euclidean/ip/inner_product/l1 are accepted."""
    name = _METRIC_ALIASES.get(str(metric).lower(), str(metric).lower())
    if name not in allowed:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(allowed)}")
    return name


def check_backend(backend: str) -> str:
    name = str(backend).lower()
    if name not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return name


def to_numpy(x: Any, name: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise UserError(f"{name} is not an array of numbers: {e}") from None
    if arr.dtype.kind not in "fiu":
        raise UserError(
            f"{name} has dtype {arr.dtype}; expected a real floating-point or integer array "
            "(it is converted to float32)"
        )
    return arr


def as_matrix(
    x: Any, name: str, d: int | None = None, allow_vector: bool = False, d_from: str = "the base"
) -> np.ndarray:
    """`x` as a C-contiguous float32 (n, d) array; no copy when it already is one.

    d: the required number of columns, which `d_from` has (named in the error).
    allow_vector: a 1-D array is taken as one row (a single query).
    """
    arr = to_numpy(x, name)
    if arr.ndim == 1 and allow_vector:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        want = "(n, d) or (d,)" if allow_vector else "(n, d)"
        raise UserError(f"{name} must have shape {want}, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise UserError(f"{name} has 0 columns; vectors need at least one dimension")
    if d is not None and arr.shape[1] != d:
        raise UserError(f"{name} has {arr.shape[1]} columns but {d_from} has d={d}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    for start in range(0, arr.shape[0], _FINITE_CHECK_ROWS):
        if not np.isfinite(arr[start : start + _FINITE_CHECK_ROWS]).all():
            raise UserError(f"{name} contains NaN or infinite values (or values beyond float32)")
    return arr


def check_k(k: Any, n: int, what: str = "base vectors") -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise UserError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if k > n:
        raise UserError(f"k={k} exceeds the {n} {what}; choose k <= {n}")
    return k


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
