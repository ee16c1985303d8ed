"""Calibration windows, the default text, input statistics and block-by-block inputs."""

from __future__ import annotations

import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.transformer import build_transformer
from mlsyskit.quant.calibration import (
    calibration_windows,
    default_calibration_text,
    embed_inputs,
    input_abs_mean,
    recorded_inputs,
)


class CharTokenizer:
    """One token per character (the windows logic only needs ``encode``)."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        assert add_bos is False  # calibration windows never start with BOS
        return [ord(c) for c in text]


def tiny(arch: str = "llama"):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        arch=arch,
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if arch == "llama" else 4,
        hidden_dim=64,
        max_seq_len=32,
    )
    return build_transformer(cfg)


def test_windows_are_seeded_random_slices_of_the_tokenized_text():
    text = "".join(chr(48 + i % 60) for i in range(500))
    ids = calibration_windows(CharTokenizer(), text, n_windows=6, window=20, seed=3)
    assert ids.shape == (6, 20) and ids.dtype == torch.long
    tokens = CharTokenizer().encode(text, add_bos=False)
    starts = [next(s for s in range(481) if tokens[s : s + 20] == row.tolist()) for row in ids]
    assert len(set(starts)) > 1
    assert torch.equal(ids, calibration_windows(CharTokenizer(), text, 6, 20, seed=3))
    assert not torch.equal(ids, calibration_windows(CharTokenizer(), text, 6, 20, seed=4))
    exact = calibration_windows(CharTokenizer(), text[:20], 2, 20)  # exactly one window long
    assert exact.tolist() == [tokens[:20]] * 2


@pytest.mark.parametrize(
    ("n", "window", "match"),
    [(2, 21, "fewer than one window"), (0, 5, "at least 1"), (2, 0, "at least 1")],
)
def test_windows_refuse_short_texts_and_bad_sizes(n, window, match):
    with pytest.raises(UserError, match=match):
        calibration_windows(CharTokenizer(), "x" * 20, n_windows=n, window=window)


def test_default_text_is_pythons_documentation():
    text = default_calibration_text()
    assert len(text) > 100_000
    assert "assert" in text and text == default_calibration_text()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_blocks_from_embed_inputs_reproduce_the_forward(arch):
    model = tiny(arch)
    ids = torch.randint(0, 64, (3, 16))
    x, rope = embed_inputs(model, ids)
    assert (rope is None) == (arch == "gpt2")
    with torch.no_grad():
        for block in model.layers:
            x = block(x, rope)
        torch.testing.assert_close(model.logits(x), model(ids))


def test_input_abs_mean_is_the_mean_magnitude_of_each_input_channel():
    model = tiny()
    ids = torch.randint(0, 64, (5, 12))
    stats = input_abs_mean(model, ids, batch_size=2)  # 3 batches, summed correctly
    assert set(stats) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        x = model.layers[0].attn_norm(model.embed(ids))
    torch.testing.assert_close(stats["layers.0.attn.qkv"], x.abs().mean((0, 1)))
    assert stats["layers.1.ffn.down"].shape == (64,)
    only = input_abs_mean(model, ids, ["layers.1.attn.o_proj"])
    assert list(only) == ["layers.1.attn.o_proj"]
    torch.testing.assert_close(only["layers.1.attn.o_proj"], stats["layers.1.attn.o_proj"])
    with pytest.raises(UserError, match="no linear layer"):
        input_abs_mean(model, ids, ["layers.9.attn.qkv"])


def test_recorded_inputs_collects_flattened_inputs_and_removes_its_hooks():
    model = tiny()
    ids = torch.randint(0, 64, (2, 8))
    lin = model.layers[0].attn.o_proj
    with recorded_inputs({"o": lin}) as rec, torch.no_grad():
        model(ids)
        model(ids[:1])
    assert [t.shape for t in rec["o"]] == [(16, 32), (8, 32)]
    assert not lin._forward_pre_hooks
