"""Secure aggregation by pairwise masking (Bonawitz et al. 2017), without Shamir recovery.

Each client holds an X25519 key pair. For a round, clients k < j agree on a seed
(X25519 + HKDF-SHA256, bound to the round and attempt) and expand it with AES-256-CTR into a
mask over Z_{2^32}; k adds it, j subtracts it. A client sends its weighted update in fixed
point modulo 2^32 plus its masks, which looks uniform to the server; the masks cancel only in
the sum over all the round's clients, so the server learns the sum and nothing else.

Not done here: the Shamir shares of the mask seeds that let the server unmask when clients
drop out after sending. A round where some client of the masked set did not answer is instead
rerun among the clients that answered, re-keyed (see `mlsyskit.fl.grpc_server`).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRAC_BITS = 16  # fixed-point step 2^-16
LIMIT = 2.0**31 / 2**FRAC_BITS  # |sum| must stay below this (32768) per coordinate


def keypair() -> tuple[X25519PrivateKey, bytes]:
    priv = X25519PrivateKey.generate()
    return priv, priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_seed(priv: X25519PrivateKey, peer_pub: bytes, rnd: int, attempt: int) -> bytes:
    shared = priv.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    return HKDF(hashes.SHA256(), 32, salt=None, info=f"mlsyskit secagg {rnd} {attempt}".encode()).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uint32 words of AES-256-CTR keystream under `seed`."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * n)), dtype=np.uint32).copy()


def encode(x: np.ndarray) -> np.ndarray:
    """Fixed point modulo 2^32 (ValueError if a value is not finite or out of range)."""
    if not np.isfinite(x).all() or np.abs(x).max(initial=0.0) >= LIMIT:
        raise ValueError(f"update out of the fixed-point range (|x| < {LIMIT:g}) or not finite")
    return (np.round(x * 2**FRAC_BITS).astype(np.int64) % 2**32).astype(np.uint32)


def mask(client: int, values: np.ndarray, priv: X25519PrivateKey, peers: dict[int, bytes], rnd: int, attempt: int) -> np.ndarray:
    """`values` (uint32) plus the pairwise masks of `client` towards every other peer."""
    y = values.copy()
    for j, pub in peers.items():
        if j == client:
            continue
        m = prg(pair_seed(priv, pub, rnd, attempt), len(y))
        y = y + m if client < j else y - m  # uint32 arithmetic wraps modulo 2^32
    return y


def unmask_sum(masked: list[np.ndarray]) -> np.ndarray:
    """The float64 sum of the clients' encoded values, from their masked vectors (masks cancel)."""
    total = np.zeros_like(masked[0])
    for y in masked:
        total = total + y
    signed = total.astype(np.int64)
    signed[signed >= 2**31] -= 2**32
    return signed / 2**FRAC_BITS
