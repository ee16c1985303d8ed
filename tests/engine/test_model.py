"""Our transformer's logits equal Hugging Face transformers' for the same weights."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from mlsyskit.models.checkpoint import Checkpoint, load_checkpoint
from mlsyskit.models.transformer import build_transformer

PROMPT = "The quick brown fox jumps over the lazy dog. Une phrase en français, 123 + 456 = 579."


def _hf_logits(folder: Path, ids: list[int], gguf_file: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _ours(ckpt: Checkpoint, ids: list[int]) -> torch.Tensor:
    model = build_transformer(ckpt.config, ckpt.state_dict)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"max relative error {rel:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_gpt2_dir"])
def test_tiny_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(folder)
    ids = ckpt.tokenizer.encode(PROMPT)[:60]
    _assert_close(_ours(ckpt, ids), _hf_logits(folder, ids))


def test_smollm2_logits_match_transformers(
    smollm2_path: Path, smollm2_checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2 dequantized from the GGUF: transformers dequantizes it independently."""
    import gguf

    # transformers rebuilds this name map ~400 times while loading; memoizing it saves ~10 s
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    ids = smollm2_checkpoint.tokenizer.encode(PROMPT)
    ref = _hf_logits(smollm2_path.parent, ids, gguf_file=smollm2_path.name)
    _assert_close(_ours(smollm2_checkpoint, ids), ref)


def test_model_rejects_sequences_longer_than_context(tiny_gpt2_dir: Path) -> None:
    from mlsyskit.errors import UserError

    ckpt = load_checkpoint(tiny_gpt2_dir)
    model = build_transformer(ckpt.config, ckpt.state_dict)
    with pytest.raises(UserError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
