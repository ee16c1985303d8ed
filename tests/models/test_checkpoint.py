"""load_checkpoint dispatch and its refusals: each bad input is one clear UserError."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import (
    Checkpoint,
    default_model_path,
    expected_shapes,
    load_checkpoint,
)


def test_default_model_is_the_packaged_smollm2(smollm2_path: Path) -> None:
    assert default_model_path() == smollm2_path
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()


def test_none_loads_the_default_model(smollm2_checkpoint: Checkpoint, smollm2_path: Path) -> None:
    # smollm2_checkpoint is load_checkpoint(None)
    assert smollm2_checkpoint.source == str(smollm2_path.resolve())
    assert smollm2_checkpoint.original_bytes == smollm2_path.stat().st_size


def test_state_dict_has_exactly_the_expected_names(smollm2_checkpoint: Checkpoint) -> None:
    sd = smollm2_checkpoint.state_dict
    want = expected_shapes(smollm2_checkpoint.config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_pickled_checkpoints_are_never_loaded(tmp_path: Path, tiny_llama_dir: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin is a pickled"):
        load_checkpoint(tmp_path)  # no config.json
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    shutil.copy(tiny_llama_dir / "tokenizer.json", tmp_path)
    with pytest.raises(UserError, match="pytorch_model.bin is a pickled"):
        load_checkpoint(tmp_path)  # a HF dir with only pickled weights
    with pytest.raises(UserError, match="pickled"):
        load_checkpoint(tmp_path / "pytorch_model.bin")  # the file itself


def test_quantized_checkpoint_dir_is_left_to_quant(tmp_path: Path) -> None:
    (tmp_path / "quant_config.json").write_text("{}")
    with pytest.raises(UserError, match="mlsyskit.quant"):
        load_checkpoint(tmp_path)


def test_unknown_file_kind(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError, match="neither a .gguf file"):
        load_checkpoint(tmp_path / "weights.npz")


def test_safetensors_file_inside_a_hf_dir_loads_the_dir(tiny_llama_dir: Path) -> None:
    ck = load_checkpoint(tiny_llama_dir / "model.safetensors")
    assert ck.source == str(tiny_llama_dir.resolve())
