"""DP-FedAvg: clipping, server noise, equal weights, and epsilon from dp-accounting's RDP accountant."""

import json
import math

import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.fl import FLConfig, run, secagg
from mlsyskit.fl.privacy import client_noise, epsilon


def _cfg(tmp_path, name, data_dir, **kw):
    base = dict(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", clients=20,
                fraction=0.5, local_epochs=1, batch_size=50, lr=0.1, rounds=3, out=str(tmp_path / name))
    base.update(kw)
    return FLConfig(**base)


def _rows(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_dp_rows_carry_a_growing_epsilon_and_noise_costs_accuracy(tmp_path, data_dir):
    run(_cfg(tmp_path, "low", data_dir, dp_clip=1.0, dp_noise_multiplier=0.3), progress=False)
    run(_cfg(tmp_path, "huge", data_dir, dp_clip=1.0, dp_noise_multiplier=300.0), progress=False)
    low, huge = _rows(tmp_path / "low"), _rows(tmp_path / "huge")
    eps = [r["epsilon"] for r in low]
    assert all(r["delta"] == 1e-5 for r in low)
    assert eps == sorted(eps) and eps[0] < eps[-1] and math.isfinite(eps[-1])  # privacy spent grows per round
    assert eps[-1] == pytest.approx(epsilon(0.5, 0.3, 3, 1e-5))
    assert huge[-1]["epsilon"] < eps[-1]  # more noise, less privacy spent
    assert low[-1]["test_accuracy"] > 0.7 and huge[-1]["test_accuracy"] < low[-1]["test_accuracy"] - 0.2


def test_dp_without_noise_equals_clipping_with_equal_weights(tmp_path, data_dir):
    # z = 0: no noise, epsilon infinite (written as null); the run is still deterministic
    run(_cfg(tmp_path, "a", data_dir, dp_clip=0.5, dp_noise_multiplier=0.0, rounds=2), progress=False)
    run(_cfg(tmp_path, "b", data_dir, dp_clip=0.5, dp_noise_multiplier=0.0, rounds=2), progress=False)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]
    assert a[-1]["epsilon"] is None


def test_noise_shared_by_clients_under_secure_aggregation_sums_to_the_target_sigma():
    z, clip, t, n = 1.5, 0.8, 4, 40_000
    rng = np.random.default_rng(0)
    updates = {c: rng.uniform(-0.01, 0.01, n) for c in range(6)}

    def noise_std(clients):
        values = {c: secagg.encode(updates[c] + client_noise(n, z, clip, t)) for c in clients}
        total, _ = secagg.run_in_process(values, rnd=1, attempt=0, t=t)
        return float((total - sum(updates[c] for c in clients)).std())

    # t clients: exactly z*C (the sample std of 40k normals is within ~0.4% of the truth);
    # more clients: sqrt(K/t) times it, never less than the accounted z*C
    assert noise_std(range(t)) == pytest.approx(z * clip, rel=0.02)
    assert noise_std(range(6)) == pytest.approx(z * clip * math.sqrt(6 / t), rel=0.02)
    # each client's share is fresh entropy: not the run's seed, not the same twice
    a, b = client_noise(1000, z, clip, t), client_noise(1000, z, clip, t)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15


def test_dp_under_secagg_spends_the_same_epsilon_and_learns(tmp_path, data_dir):
    run(_cfg(tmp_path, "plain", data_dir, dp_clip=1.0, dp_noise_multiplier=0.3), progress=False)
    run(_cfg(tmp_path, "secure", data_dir, dp_clip=1.0, dp_noise_multiplier=0.3, secagg=True), progress=False)
    run(_cfg(tmp_path, "huge", data_dir, dp_clip=1.0, dp_noise_multiplier=300.0, secagg=True), progress=False)
    plain, secure, huge = _rows(tmp_path / "plain"), _rows(tmp_path / "secure"), _rows(tmp_path / "huge")
    assert [r["epsilon"] for r in secure] == [r["epsilon"] for r in plain]
    assert secure[-1]["test_accuracy"] > 0.7 and abs(secure[-1]["test_accuracy"] - plain[-1]["test_accuracy"]) < 0.1
    assert huge[-1]["test_accuracy"] < secure[-1]["test_accuracy"] - 0.2  # the clients' noise is really in the sum


def test_accountant_matches_known_behaviour():
    assert epsilon(1.0, 0.0, 5, 1e-5) == math.inf
    # more rounds or less noise spend more privacy; subsampling amplifies privacy
    assert epsilon(0.1, 1.0, 10, 1e-5) < epsilon(0.1, 1.0, 100, 1e-5)
    assert epsilon(0.1, 2.0, 10, 1e-5) < epsilon(0.1, 1.0, 10, 1e-5)
    assert epsilon(0.01, 1.0, 10, 1e-5) < epsilon(1.0, 1.0, 10, 1e-5)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(dp_noise_multiplier=1.0), "needs --dp-clip"),
        (dict(dp_clip=1.0, strategy="median"), "not a mean"),
        (dict(dp_clip=-1.0), "--dp-clip must be positive"),
        (dict(dp_clip=1.0, dp_delta=0.0), "--dp-delta"),
    ],
)
def test_bad_dp_flags_are_one_clear_error(tmp_path, kw, msg):
    with pytest.raises(UserError, match=msg):
        _cfg(tmp_path, "x", None, **kw).resolved()
