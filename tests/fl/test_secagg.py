"""Secure aggregation: masks cancel in the sum, each masked update looks uniform, Shamir shares
recover the sum when clients drop, and a round below the threshold fails."""

import json

import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.fl import FLConfig, run, secagg


def test_masks_cancel_in_the_sum_and_each_masked_update_looks_uniform():
    rng = np.random.default_rng(0)
    k, n = 4, 20_000
    keys = [secagg.keypair() for _ in range(k)]
    peers = {i: pub for i, (_, pub) in enumerate(keys)}
    plain = [rng.normal(size=n) * 10 for _ in range(k)]
    masked = [secagg.mask(i, secagg.encode(plain[i]), keys[i][0], peers, rnd=3, attempt=0) for i in range(k)]
    # the unmasked sum equals the plain sum within the fixed-point step (rounding per client)
    assert np.abs(secagg.unmask_sum(masked) - sum(plain)).max() <= k * 2.0**-secagg.FRAC_BITS
    # what the server receives from one client: uniform over Z_2^32, unrelated to its update
    y = masked[0].astype(np.float64) / 2**32
    counts = np.histogram(y, bins=16, range=(0, 1))[0]
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 40  # 15 degrees of freedom: p ~ 5e-4
    assert abs(np.corrcoef(y, plain[0])[0, 1]) < 0.05
    # a missing client leaves the sum masked (no recovery without it)
    assert np.abs(secagg.unmask_sum(masked[:-1]) - sum(plain[:-1])).max() > 1e3
    # another round or attempt gives other masks
    again = secagg.mask(0, secagg.encode(plain[0]), keys[0][0], peers, rnd=3, attempt=1)
    assert (again != masked[0]).mean() > 0.99


def test_shamir_any_t_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = secagg.shamir_split(secret, [1, 2, 3, 4, 5], t=3)
    for pick in ([1, 2, 3], [2, 4, 5], [1, 3, 5, 4]):
        assert secagg.shamir_join({x: shares[x] for x in pick}) == secret
    with pytest.raises(secagg.SecAggError):  # two points of a degree-2 polynomial: a random field element
        secagg.shamir_join({x: shares[x] for x in (1, 2)})


def test_protocol_recovers_the_sum_when_clients_drop_and_fails_below_threshold():
    rng = np.random.default_rng(1)
    plain = {c: rng.normal(size=5000) * 10 for c in range(6)}
    values = {c: secagg.encode(x) for c, x in plain.items()}
    step = 6 * 2.0**-secagg.FRAC_BITS
    total, u3 = secagg.run_in_process(values, rnd=2, attempt=0, t=4)
    assert u3 == list(range(6)) and np.abs(total - sum(plain.values())).max() <= step
    # client 2 vanishes after sharing (its pairwise masks are rebuilt from the others' shares of
    # its key), client 4 after sending its masked input (its self mask is rebuilt): the sum of
    # the five masked inputs that arrived, and only those
    total, u3 = secagg.run_in_process(values, rnd=2, attempt=0, t=4, drop_before_mask={2}, drop_after_mask={4})
    assert u3 == [0, 1, 3, 4, 5] and np.abs(total - sum(plain[c] for c in u3)).max() <= step
    with pytest.raises(secagg.SecAggError, match="fewer than the threshold 5"):  # 3 answer the unmasking
        secagg.run_in_process(values, rnd=2, attempt=0, t=5, drop_before_mask={2}, drop_after_mask={4, 5})
    with pytest.raises(secagg.SecAggError, match="threshold"):  # a client refuses to unmask below t
        s = secagg.ClientRound(0, 1, 0)
        s.masked_set = [0, 1, 2]
        s.unmask([0], t=2)


def test_what_the_server_gets_in_the_protocol_looks_uniform_and_shares_are_sealed():
    n = 20_000
    rounds = {c: secagg.ClientRound(c, 5, 0) for c in range(3)}
    keys = {c: r.advertise() for c, r in rounds.items()}
    cts = {c: r.share(keys, 2) for c, r in rounds.items()}
    x = np.linspace(-1, 1, n)  # a very non-uniform update
    y = rounds[0].masked_input(secagg.encode(x), [0, 1, 2], {u: cts[u][0] for u in range(3)})
    counts = np.histogram(y.astype(np.float64) / 2**32, bins=16, range=(0, 1))[0]
    assert float(((counts - n / 16) ** 2 / (n / 16)).sum()) < 40  # 15 degrees of freedom: p ~ 5e-4
    # the shares the server routes are AES-GCM sealed: a flipped byte is refused, not misread
    rounds[1].masked_input(secagg.encode(x), [0, 1, 2], {u: cts[u][1] for u in range(3)})
    forged = bytearray(rounds[1].held[0])
    forged[20] ^= 1
    rounds[1].held[0] = bytes(forged)
    with pytest.raises(secagg.SecAggError, match="does not decrypt"):
        rounds[1].unmask([0, 1, 2], t=2)


def test_encode_refuses_non_finite_or_out_of_range():
    for bad in ([np.nan], [secagg.LIMIT]):
        with pytest.raises(ValueError):
            secagg.encode(np.array(bad))


def test_simulated_secagg_run_matches_plain_fedavg(tmp_path, data_dir):
    def cfg(name, **kw):
        return FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", clients=10,
                        fraction=0.5, local_epochs=1, batch_size=50, lr=0.1, rounds=2, out=str(tmp_path / name), **kw)

    run(cfg("plain"), progress=False)
    run(cfg("secure", secagg=True), progress=False)
    rows = {n: [json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")] for n in ("plain", "secure")}
    for p, s in zip(rows["plain"], rows["secure"], strict=True):
        assert s["clients"] == p["clients"] == 5
        assert s["test_loss"] == pytest.approx(p["test_loss"], rel=1e-4)


@pytest.mark.parametrize("kw, msg", [(dict(strategy="krum"), "needs each update"), (dict(malicious=1), "--malicious"), (dict(secagg_threshold=6), "exceeds the 5")])
def test_secagg_refuses_what_needs_individual_updates(kw, msg):
    with pytest.raises(UserError, match=msg):
        FLConfig(clients=10, fraction=0.5, model="logreg", secagg=True, **kw).resolved()
