"""Pairwise additive masking (the core of Bonawitz et al.'s secure aggregation, 2017).

Each pair of clients (i, j) shares a seed; client i adds the pseudo-random mask m_ij for every
j > i and subtracts m_ji for every j < i, so the masks cancel in the sum of all messages and
the server learns only that sum. Values are encoded in fixed point (2^FRACTION_BITS) as
64-bit integers and every operation is modulo 2^64 (numpy's uint64 wraps), so the masks
cancel exactly, with no floating-point residue. Not handled: clients that drop out after
masking (the protocol's secret sharing of seeds), and key agreement: the seeds travel
client-to-client over MPI, never through the server.
"""

from __future__ import annotations

import numpy as np

FRACTION_BITS = 32
SCALE = float(2**FRACTION_BITS)


def encode(values: np.ndarray) -> np.ndarray:
    """float64 -> fixed point, as uint64 (two's complement)."""
    return np.rint(values * SCALE).astype(np.int64).view(np.uint64)


def decode(codes: np.ndarray) -> np.ndarray:
    """uint64 fixed point (a sum of encoded values, mod 2^64) -> float64."""
    return codes.view(np.int64).astype(np.float64) / SCALE


def pair_mask(seed: int, round_: int, size: int) -> np.ndarray:
    """The mask of one pair in one round: uniform uint64 words from the pair's seed."""
    return np.random.default_rng([seed, round_]).integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)


def mask(codes: np.ndarray, me: int, seeds: dict[int, int], round_: int) -> np.ndarray:
    """``codes`` of client ``me`` plus the masks shared with higher-numbered clients, minus
    those shared with lower-numbered ones (mod 2^64). ``seeds``: peer -> shared seed."""
    out = codes.copy()
    for peer, seed in seeds.items():
        m = pair_mask(seed, round_, codes.size)
        if peer > me:
            out += m
        else:
            out -= m
    return out


def unmask_sum(messages: np.ndarray) -> np.ndarray:
    """The server's view: the sum of all clients' masked messages (rows), decoded."""
    return decode(messages.sum(axis=0, dtype=np.uint64))
