import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.models import (
    CHAR_MODELS,
    IMAGE_MODELS,
    MODEL_NAMES,
    build_model,
    count_parameters,
)


def test_names() -> None:
    assert MODEL_NAMES == ("2nn", "cnn", "mlp", "logreg", "lstm", "transformer")
    assert IMAGE_MODELS == ("2nn", "cnn", "mlp", "logreg")
    assert CHAR_MODELS == ("lstm", "transformer")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cnn", 1_663_370),
        ("2nn", 199_210),
        ("mlp", 784 * 64 + 64 + 64 * 10 + 10),
        ("logreg", 7_850),
    ],
)
def test_param_counts(name: str, expected: int) -> None:
    assert count_parameters(build_model(name)) == expected


def test_lstm_param_count_matches_paper_layout() -> None:
    v = 80
    lstm = 4 * 256 * (8 + 256 + 2) + 4 * 256 * (256 + 256 + 2)
    assert count_parameters(build_model("lstm", vocab_size=v)) == v * 8 + lstm + 256 * v + v


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_output_shapes(name: str) -> None:
    model = build_model(name, num_classes=7)
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(model(x.reshape(5, 784)), out)


@pytest.mark.parametrize("name", CHAR_MODELS)
def test_char_output_shapes(name: str) -> None:
    model = build_model(name, vocab_size=33, seq_len=12)
    out = model(torch.randint(0, 33, (3, 12)))
    assert out.shape == (3, 12, 33) and out.dtype == torch.float32
    assert model(torch.randint(0, 33, (2, 5))).shape == (2, 5, 33)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_deterministic_init(name: str) -> None:
    torch.manual_seed(123)
    a = build_model(name, vocab_size=30)
    torch.manual_seed(123)
    b = build_model(name, vocab_size=30)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_dropout_or_batchnorm(name: str) -> None:
    model = build_model(name, vocab_size=30)
    for m in model.modules():
        assert not isinstance(m, torch.nn.modules.dropout._DropoutNd)
        assert not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        assert getattr(m, "dropout", 0) == 0
    assert isinstance(type(model).supports_vmap, bool)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(
        UserError, match="unknown model 'resnet'.*2nn, cnn, mlp, logreg, lstm, transformer"
    ):
        build_model("resnet")


@pytest.mark.parametrize("name", CHAR_MODELS)
def test_char_model_needs_vocab(name: str) -> None:
    with pytest.raises(UserError, match=f"model '{name}' needs vocab_size"):
        build_model(name)


def test_bad_sizes() -> None:
    with pytest.raises(UserError, match="num_classes"):
        build_model("cnn", num_classes=0)
    with pytest.raises(UserError, match="vocab_size"):
        build_model("lstm", vocab_size=0)
    with pytest.raises(UserError, match="seq_len"):
        build_model("transformer", vocab_size=10, seq_len=0)


def test_transformer_rejects_too_long_input() -> None:
    model = build_model("transformer", vocab_size=10, seq_len=4)
    with pytest.raises(UserError, match="exceeds the model's seq_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
