"""Secure aggregation with dropout recovery (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

One round, for the clients U1 that advertised keys (complete graph, threshold t):

1. **keys**: each client makes fresh X25519 pairs for the round, ``c`` (to encrypt shares to
   its peers) and ``s`` (to agree on masks), and a self-mask seed ``b``.
2. **share**: it Shamir-shares ``s_sk`` and ``b`` t-out-of-|U1| over GF(2^521 - 1) and sends
   each peer its share, AES-GCM encrypted under c-key agreement; the server only routes them.
3. **mask**: a client of U2 (those who shared) sends ``y = x + PRG(b) + sum_v +-PRG(s_uv)``
   over Z_{2^32}, x its update in fixed point; ``y`` looks uniform to the server.
4. **unmask**: the server names U3 (those whose ``y`` arrived); each surviving client reveals,
   for every peer of U2, its share of ``b`` if that peer is in U3, else its share of ``s_sk``
   (never both for one peer). With at least t such answers the server rebuilds each ``b_u``
   of U3 (to remove self masks) and each dropped client's ``s_sk`` (to remove the pairwise
   masks it left behind), and learns the sum of U3's updates and nothing else.

Fewer than t clients at any step: the round cannot be unmasked and fails (`SecAggError`).
Masks come from HKDF-SHA256 of the X25519 secret, expanded with AES-256-CTR. Keys live for one
round attempt, so revealing a dropped client's ``s_sk`` reveals nothing of other rounds.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRAC_BITS = 16  # fixed-point step 2^-16
LIMIT = 2.0**31 / 2**FRAC_BITS  # |sum| must stay below this (32768) per coordinate
PRIME = 2**521 - 1  # Mersenne prime: the Shamir field holds any 32-byte secret
SHARE_BYTES = 66  # one field element


class SecAggError(Exception):
    """A secure-aggregation round cannot complete (too few clients, a bad message)."""


def keypair() -> tuple[X25519PrivateKey, bytes]:
    priv = X25519PrivateKey.generate()
    return priv, priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw(priv: X25519PrivateKey) -> bytes:
    return priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _kdf(priv: X25519PrivateKey, peer_pub: bytes, info: str) -> bytes:
    shared = priv.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    return HKDF(hashes.SHA256(), 32, salt=None, info=info.encode()).derive(shared)


def pair_seed(priv: X25519PrivateKey, peer_pub: bytes, rnd: int, attempt: int) -> bytes:
    return _kdf(priv, peer_pub, f"mlsyskit secagg {rnd} {attempt}")


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uint32 words of AES-256-CTR keystream under `seed`."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * n)), dtype=np.uint32).copy()


def encode(x: np.ndarray) -> np.ndarray:
    """Fixed point modulo 2^32 (ValueError if a value is not finite or out of range)."""
    if not np.isfinite(x).all() or np.abs(x).max(initial=0.0) >= LIMIT:
        raise ValueError(f"update out of the fixed-point range (|x| < {LIMIT:g}) or not finite")
    return (np.round(x * 2**FRAC_BITS).astype(np.int64) % 2**32).astype(np.uint32)


def decode(total: np.ndarray) -> np.ndarray:
    """The float64 values of a uint32 fixed-point vector (a sum of `encode`d vectors)."""
    signed = total.astype(np.int64)
    signed[signed >= 2**31] -= 2**32
    return signed / 2**FRAC_BITS


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
    """The float64 sum of the clients' encoded values from masked vectors whose masks cancel."""
    total = np.zeros_like(masked[0])
    for y in masked:
        total = total + y
    return decode(total)


# -- Shamir secret sharing over GF(PRIME) -------------------------------------------------------
def shamir_split(secret: bytes, xs: list[int], t: int) -> dict[int, int]:
    """Shares y = f(x) of a polynomial of degree t-1 with f(0) = secret, for each x (> 0)."""
    if not 1 <= t <= len(xs):
        raise SecAggError(f"threshold {t} outside 1..{len(xs)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def shamir_join(shares: dict[int, int], size: int = 32) -> bytes:
    """The secret from at least t shares {x: y} (Lagrange interpolation at 0)."""
    secret = 0
    for xi, yi in shares.items():
        num, den = 1, 1
        for xj in shares:
            if xj != xi:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise SecAggError("the shares do not rebuild a secret (too few or inconsistent)")
    return secret.to_bytes(size, "big")


def _x(client: int) -> int:
    return client + 1  # share coordinates must be non-zero


def _share_key(priv: X25519PrivateKey, peer_pub: bytes, rnd: int, attempt: int) -> AESGCM:
    return AESGCM(_kdf(priv, peer_pub, f"mlsyskit secagg shares {rnd} {attempt}"))


def _nonce(sender: int, receiver: int) -> bytes:
    return struct.pack(">IIxxxx", sender, receiver)


@dataclass
class ClientRound:
    """One client's side of one round attempt: its keys, self-mask seed and received shares."""

    client: int
    rnd: int
    attempt: int
    c_sk: X25519PrivateKey = field(init=False)
    s_sk: X25519PrivateKey = field(init=False)
    b: bytes = field(init=False)
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (c_pk, s_pk)
    held: dict[int, bytes] = field(default_factory=dict)  # peer -> that peer's ciphertext for us
    masked_set: list[int] = field(default_factory=list)  # U2, the peers masked against

    def __post_init__(self) -> None:
        self.c_sk, _ = keypair()
        self.s_sk, _ = keypair()
        self.b = secrets.token_bytes(32)

    def advertise(self) -> dict[str, str]:
        """Phase 1: the public keys, as hex."""
        pub = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return {"c": self.c_sk.public_key().public_bytes(*pub).hex(), "s": self.s_sk.public_key().public_bytes(*pub).hex()}

    def share(self, keys: dict[int, dict[str, str]], t: int) -> dict[int, str]:
        """Phase 2: encrypted shares of s_sk and b for every client of U1 (hex, by receiver)."""
        try:
            self.keys = {int(v): (bytes.fromhex(k["c"]), bytes.fromhex(k["s"])) for v, k in keys.items()}
        except (KeyError, ValueError, TypeError) as e:
            raise SecAggError(f"malformed key list ({e})") from None
        if self.client not in self.keys or t > len(self.keys) or t < 1:
            raise SecAggError(f"key list of {len(self.keys)} clients without this one, or below threshold {t}")
        xs = [_x(v) for v in self.keys]
        s_sh, b_sh = shamir_split(_raw(self.s_sk), xs, t), shamir_split(self.b, xs, t)
        out = {}
        for v, (c_pk, _) in self.keys.items():
            plain = struct.pack(">II", self.client, v) + s_sh[_x(v)].to_bytes(SHARE_BYTES, "big") + b_sh[_x(v)].to_bytes(SHARE_BYTES, "big")
            out[v] = _share_key(self.c_sk, c_pk, self.rnd, self.attempt).encrypt(_nonce(self.client, v), plain, None).hex()
        return out

    def masked_input(self, values: np.ndarray, masked_set: list[int], held: dict[int, str]) -> np.ndarray:
        """Phase 3: `values` (uint32) plus the self mask and the pairwise masks towards U2."""
        u2 = sorted(int(v) for v in masked_set)
        if self.client not in u2 or not set(u2) <= set(self.keys) or set(u2) - {int(u) for u in held}:
            raise SecAggError("the masked set must contain this client, be among the advertised keys and come with its shares")
        self.masked_set = u2
        self.held = {int(u): bytes.fromhex(ct) for u, ct in held.items() if int(u) in u2}
        y = values + prg(self.b, len(values))
        return mask(self.client, y, self.s_sk, {v: self.keys[v][1] for v in u2}, self.rnd, self.attempt)

    def unmask(self, survivors: list[int], t: int) -> dict[int, list]:
        """Phase 4: for each peer of U2, [\"b\", share] if it survived (in U3), else [\"s\", share] (hex)."""
        u3 = {int(v) for v in survivors}
        if len(u3) < t or not u3 <= set(self.masked_set) or self.client not in u3:
            raise SecAggError(f"refusing to unmask: {len(u3)} survivors, threshold {t}, or not a subset of the masked set")
        out: dict[int, list] = {}
        for u in self.masked_set:
            c_pk = self.keys[u][0]
            try:
                plain = _share_key(self.c_sk, c_pk, self.rnd, self.attempt).decrypt(_nonce(u, self.client), self.held[u], None)
            except Exception:  # noqa: BLE001 - a forged or corrupted share
                raise SecAggError(f"the share from client {u} does not decrypt") from None
            if struct.unpack(">II", plain[:8]) != (u, self.client):
                raise SecAggError(f"the share from client {u} is addressed wrongly")
            s_share, b_share = plain[8 : 8 + SHARE_BYTES], plain[8 + SHARE_BYTES :]
            out[u] = ["b", b_share.hex()] if u in u3 else ["s", s_share.hex()]
        return out


def recover_sum(
    masked: dict[int, np.ndarray], keys: dict[int, dict[str, str]], masked_set: list[int],
    reveals: dict[int, dict[int, list]], t: int, rnd: int, attempt: int,
) -> np.ndarray:
    """The server's phase 4: the float64 sum of the updates of U3 = `masked`'s clients.

    `keys` are U1's advertised keys, `masked_set` is U2 and `reveals` maps each answering
    client to its phase-4 answer. SecAggError if fewer than t answered or a share is missing.
    """
    u3 = sorted(masked)
    dropped = sorted(set(masked_set) - set(u3))
    if len(reveals) < t:
        raise SecAggError(f"only {len(reveals)} clients answered the unmasking, fewer than the threshold {t}")
    n = len(next(iter(masked.values())))
    total = np.zeros(n, dtype=np.uint32)
    for y in masked.values():
        total = total + y

    def rebuild(u: int, kind: str) -> bytes:
        shares = {}
        for w, ans in reveals.items():
            got = ans.get(u) or ans.get(str(u))  # type: ignore[call-overload]
            if isinstance(got, list) and len(got) == 2 and got[0] == kind:
                try:
                    shares[_x(int(w))] = int.from_bytes(bytes.fromhex(got[1]), "big")
                except ValueError:
                    continue
            if len(shares) == t:
                break
        if len(shares) < t:
            raise SecAggError(f"fewer than {t} shares of client {u}'s {'self-mask seed' if kind == 'b' else 'mask key'}")
        return shamir_join(shares)

    for u in u3:  # remove the self masks
        total = total - prg(rebuild(u, "b"), n)
    for d in dropped:  # remove the pairwise masks a dropped client left in the survivors' inputs
        s_sk = X25519PrivateKey.from_private_bytes(rebuild(d, "s"))
        for v in u3:
            m = prg(pair_seed(s_sk, bytes.fromhex(keys[v]["s"]), rnd, attempt), n)
            total = total - m if v < d else total + m  # v added +m towards a larger d, -m towards a smaller: undo it
    return decode(total)


def default_threshold(n: int) -> int:
    """More than half of the round's clients (Bonawitz et al.'s honest-but-curious setting)."""
    return n // 2 + 1


def run_in_process(
    values: dict[int, np.ndarray], rnd: int, attempt: int, t: int,
    drop_before_mask: set[int] = frozenset(), drop_after_mask: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[np.ndarray, list[int]]:
    """All four phases with the clients in this process (the simulation's transport).

    `drop_before_mask` clients vanish after sharing, `drop_after_mask` after sending their
    masked input. Returns the recovered sum and U3 (whose updates it holds).
    """
    rounds = {c: ClientRound(c, rnd, attempt) for c in values}
    keys = {c: r.advertise() for c, r in rounds.items()}
    if len(keys) < t:
        raise SecAggError(f"{len(keys)} clients, fewer than the threshold {t}")
    cts = {c: r.share(keys, t) for c, r in rounds.items()}
    u2 = sorted(cts)
    masked = {}
    for c in u2:
        held = {u: cts[u][c] for u in u2}
        y = rounds[c].masked_input(values[c], u2, held)
        if c not in drop_before_mask:
            masked[c] = y
    u3 = sorted(masked)
    if len(u3) < t:
        raise SecAggError(f"only {len(u3)} masked inputs, fewer than the threshold {t}")
    reveals = {c: rounds[c].unmask(u3, t) for c in u3 if c not in drop_after_mask}
    return recover_sum(masked, keys, u2, reveals, t, rnd, attempt), u3
