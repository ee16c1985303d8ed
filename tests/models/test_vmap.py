"""Per-client gradients with torch.func.vmap(grad(...)) over stacked parameters."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from mlsyskit.models import MODEL_NAMES, CharLSTM, CharTransformer, build_model

K, B = 3, 4


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for (B, C) or (B, T, V) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_batch(model_name: str, lead: tuple[int, ...], vocab: int = 20, seq: int = 8):
    """Random (x, y) for a model: images with 10 classes, or char sequences."""
    if model_name in ("lstm", "transformer") or model_name.startswith("transformer"):
        x = torch.randint(0, vocab, (*lead, seq))
        y = torch.randint(0, vocab, (*lead, seq))
    else:
        x = torch.randn(*lead, 1, 28, 28)
        y = torch.randint(0, 10, lead)
    return x, y


def grads_of(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    ce_loss(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _models(factory, k: int = K) -> list[nn.Module]:
    out = []
    for seed in range(k):  # different parameters per client
        torch.manual_seed(100 + seed)
        out.append(factory())
    return out


def _vmap_grads(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor):
    params, _ = stack_module_state(models)
    template = models[0]

    def loss(p, xb, yb):
        return ce_loss(functional_call(template, p, (xb,)), yb)

    return vmap(grad(loss))(params, x, y)


def _llama_style() -> nn.Module:
    return CharTransformer(
        20, 8, dim=32, n_heads=4, n_kv_heads=2, norm="rmsnorm", ffn="swiglu", pos="rope"
    )


CASES = [(n, lambda n=n: build_model(n, vocab_size=20, seq_len=8)) for n in MODEL_NAMES]
CASES.append(("transformer-llama", _llama_style))


# On CPU, SDPA has no vmap batching rule and runs per client (correct, with a warning).
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize(("name", "factory"), CASES, ids=[c[0] for c in CASES])
def test_vmap_grads_match_loop(name, factory) -> None:
    models = _models(factory)
    if not type(models[0]).supports_vmap:
        pytest.skip(f"{name} does not claim vmap support")
    x, y = make_batch(name, (K, B))  # different data per client
    g = _vmap_grads(models, x, y)
    for k, model in enumerate(models):
        ref = grads_of(model, x[k], y[k])  # plain autograd, one client at a time
        assert ref.keys() == g.keys()
        for n in ref:
            torch.testing.assert_close(g[n][k], ref[n], atol=1e-5, rtol=1e-4, msg=f"{name}.{n}")


def test_expected_vmap_support() -> None:
    claims = {n: type(build_model(n, vocab_size=5)).supports_vmap for n in MODEL_NAMES}
    assert claims == {
        "2nn": True,
        "cnn": True,
        "mlp": True,
        "logreg": True,
        "lstm": False,
        "transformer": True,
    }


def test_lstm_has_no_vmap_batching_rule() -> None:
    """nn.LSTM under vmap either fails or runs through functorch's slow per-sample fallback.

    On CPU it falls back (with a "not yet implemented the batching rule" warning); on CUDA
    with cuDNN, torch.func transforms over nn.LSTM raise. If this test starts failing,
    PyTorch gained a batching rule and CharLSTM.supports_vmap can be reconsidered.
    """
    assert CharLSTM.supports_vmap is False
    models = _models(lambda: CharLSTM(10, hidden=16), k=2)
    x, y = make_batch("lstm", (2, 2), vocab=10, seq=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _vmap_grads(models, x, y)
        except (RuntimeError, NotImplementedError):
            return
    assert any("batching rule" in str(w.message) for w in caught)
