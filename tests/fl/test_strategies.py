import numpy as np
import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.fl.strategies import (
    StrategyOptions,
    krum_scores,
    make_strategy,
    weighted_mean,
)

G = torch.tensor([0.0, 0.0, 0.0])
M = torch.tensor([[1.0, 2.0, -3.0], [3.0, 0.0, 1.0], [-1.0, 4.0, 2.0]])
W = torch.tensor([1.0, 2.0, 1.0])


def test_weighted_mean_is_sample_weighted():
    # (1*[1,2,-3] + 2*[3,0,1] + 1*[-1,4,2]) / 4
    assert torch.allclose(weighted_mean(M, W), torch.tensor([1.5, 1.5, 0.25]))


def test_fedavg_weighted_and_fedprox_same_aggregate_but_sends_mu():
    avg = make_strategy("fedavg").aggregate(G, M, W)
    assert torch.allclose(avg, torch.tensor([1.5, 1.5, 0.25]))
    prox = make_strategy("fedprox", StrategyOptions(mu=0.3))
    assert torch.allclose(prox.aggregate(G, M, W), avg)
    assert prox.fit_config()["mu"] == 0.3
    assert make_strategy("fedavg").fit_config()["mu"] == 0.0


def test_fedavgm_momentum_formula():
    s = make_strategy("fedavgm", StrategyOptions(server_lr=0.5, server_momentum=0.9))
    g = torch.tensor([1.0, 1.0, 1.0])
    d1 = weighted_mean(M, W) - g
    w1 = s.aggregate(g, M, W)
    assert torch.allclose(w1, g + 0.5 * d1)
    d2 = weighted_mean(M, W) - w1
    w2 = s.aggregate(w1, M, W)
    assert torch.allclose(w2, w1 + 0.5 * (0.9 * d1 + d2))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_follow_reddi_et_al(name):
    o = StrategyOptions(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    s = make_strategy(name, o)
    g = torch.zeros(3)
    m = torch.zeros(3)
    v = torch.full((3,), o.tau**2)
    for _ in range(3):
        d = weighted_mean(M, W) - g
        m = 0.9 * m + 0.1 * d
        if name == "fedadam":
            v = 0.99 * v + 0.01 * d * d
        elif name == "fedyogi":
            v = v - 0.01 * d * d * torch.sign(v - d * d)
        else:
            v = v + d * d
        expect = g + 0.1 * m / (v.sqrt() + o.tau)
        g = s.aggregate(g, M, W)
        assert torch.allclose(g, expect, atol=1e-6)
    state = s.state_dict()
    assert set(state) == {"m", "v"}
    fresh = make_strategy(name, o)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh.aggregate(g, M, W), s.aggregate(g, M, W))


def test_median_odd_and_even():
    med = make_strategy("median")
    assert torch.allclose(med.aggregate(G, M, W), torch.tensor([1.0, 2.0, 1.0]))
    four = torch.cat([M, torch.tensor([[10.0, 10.0, 10.0]])])
    assert torch.allclose(med.aggregate(G, four, torch.ones(4)), torch.tensor([2.0, 3.0, 1.5]))


def test_trimmed_mean_cuts_extremes():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    tm = make_strategy("trimmed-mean", StrategyOptions(trim_ratio=0.2))
    assert torch.allclose(tm.aggregate(torch.zeros(1), x, torch.ones(5)), torch.tensor([2.0]))


def test_krum_picks_model_closest_to_neighbours_and_rejects_outlier():
    honest = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    models = torch.cat([honest, torch.tensor([[50.0, -50.0]])])
    f = 1
    scores = krum_scores(models, f)
    # brute force: each score is the sum of its K-f-2 = 2 smallest squared distances to others
    for i in range(5):
        d = sorted(float(((models[i] - models[j]) ** 2).sum()) for j in range(5) if j != i)
        assert scores[i].item() == pytest.approx(sum(d[:2]))
    out = make_strategy("krum", StrategyOptions(krum_f=f)).aggregate(torch.zeros(2), models, torch.ones(5))
    assert out.abs().max() < 1
    mk = make_strategy("multi-krum", StrategyOptions(krum_f=f)).aggregate(torch.zeros(2), models, torch.ones(5))
    assert torch.allclose(mk, honest.mean(0))


def test_configure_fit_samples_fraction_without_replacement():
    s = make_strategy("fedavg")
    ids = s.configure_fit(100, 0.1, np.random.default_rng(0))
    assert len(ids) == 10 and len(set(ids.tolist())) == 10 and ids.max() < 100
    assert len(s.configure_fit(5, 0.01, np.random.default_rng(0))) == 1


def test_unknown_strategy_is_user_error():
    with pytest.raises(UserError, match="unknown strategy"):
        make_strategy("fedmagic")
