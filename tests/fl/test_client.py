import numpy as np
import pytest
import torch

from mlsyskit.fl.client import (
    ClientBatch,
    LocalTraining,
    batch_plan,
    train_sequential,
    train_vectorized,
)
from mlsyskit.fl.params import ParamSpec, get_flat
from mlsyskit.models import build_model


def _data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _clients(sizes, batch_size, epochs, flips=None):
    start, idx = 0, []
    for s in sizes:
        idx.append(np.arange(start, start + s))
        start += s
    plans = [batch_plan(s, batch_size, epochs, [0, 1, c]) for c, s in enumerate(sizes)]
    return ClientBatch(idx, plans, flips or [False] * len(sizes))


def test_batch_plan_covers_each_sample_once_per_epoch_and_is_seeded():
    plan = batch_plan(23, 5, 2, [3, 1, 4])
    assert [len(b) for b in plan] == [5, 5, 5, 5, 3] * 2
    first = np.concatenate(plan[:5])
    assert sorted(first.tolist()) == list(range(23))
    again = batch_plan(23, 5, 2, [3, 1, 4])
    assert all((a == b).all() for a, b in zip(plan, again, strict=True))
    assert not all((a == b).all() for a, b in zip(plan, batch_plan(23, 5, 2, [3, 1, 5]), strict=True))
    assert [len(b) for b in batch_plan(7, None, 3, [0])] == [7, 7, 7]


@pytest.mark.parametrize(
    "model_name,sizes,batch,epochs,mu,flips",
    [
        ("mlp", [10, 17, 4], 5, 2, 0.0, None),  # unequal clients: padded steps must stand still
        ("cnn", [8, 8], 4, 1, 0.0, None),
        ("2nn", [12, 5], None, 2, 0.5, None),  # full batch + FedProx
        ("logreg", [9, 9, 9], 3, 1, 0.0, [False, True, False]),  # label-flip attack
    ],
)
def test_vectorized_training_matches_sequential_reference(model_name, sizes, batch, epochs, mu, flips):
    torch.manual_seed(0)
    model = build_model(model_name)
    w0 = get_flat(model)
    x, y = _data(sum(sizes))
    clients = _clients(sizes, batch, epochs, flips)
    cfg = LocalTraining(epochs=epochs, batch_size=batch, lr=0.1, mu=mu)
    seq, seq_loss = train_sequential(model, w0, x, y, clients, cfg, 10)
    vec, vec_loss = train_vectorized(model, w0, x, y, clients, cfg, 10)
    assert seq.shape == (len(sizes), ParamSpec.of(model).size)
    assert not torch.allclose(seq[0], w0)  # training moved the weights
    assert torch.allclose(seq, vec, atol=2e-5, rtol=1e-4)
    assert torch.allclose(seq_loss, vec_loss, atol=1e-5, rtol=1e-4)


def test_fedprox_pulls_towards_global_model():
    torch.manual_seed(0)
    model = build_model("mlp")
    w0 = get_flat(model)
    x, y = _data(40)
    clients = _clients([40], 5, 3)
    free, _ = train_sequential(model, w0, x, y, clients, LocalTraining(3, 5, 0.1, 0.0), 10)
    prox, _ = train_sequential(model, w0, x, y, clients, LocalTraining(3, 5, 0.1, 5.0), 10)
    assert (prox - w0).norm() < 0.7 * (free - w0).norm()
