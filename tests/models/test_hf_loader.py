"""HF safetensors directories: tiny Llama / Qwen2 / GPT-2 saved by transformers load exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import load_checkpoint


def _transformers_state(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict transformers itself loads from ``folder``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _llama_reference(hf: dict[str, torch.Tensor], n_layers: int, tied: bool, bias: bool):
    """HF Llama/Qwen2 names -> ours, written out independently of the loader."""
    ref = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(n_layers):
        h, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        ref[f"layers.{i}.attn_norm.weight"] = hf[h + "input_layernorm.weight"]
        ref[f"layers.{i}.ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        ref[f"layers.{i}.attn.qkv.weight"] = torch.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"])
        if bias:
            ref[f"layers.{i}.attn.qkv.bias"] = torch.cat([hf[a + f"{x}_proj.bias"] for x in "qkv"])
        ref[f"layers.{i}.attn.o_proj.weight"] = hf[a + "o_proj.weight"]
        ref[f"layers.{i}.ffn.gate_up.weight"] = torch.cat(
            [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]
        )
        ref[f"layers.{i}.ffn.down.weight"] = hf[h + "mlp.down_proj.weight"]
    if not tied:
        ref["lm_head.weight"] = hf["lm_head.weight"]
    return ref


def _gpt2_reference(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    ref = {
        "embed.weight": hf["transformer.wte.weight"],
        "pos_embed.weight": hf["transformer.wpe.weight"],
        "norm.weight": hf["transformer.ln_f.weight"],
        "norm.bias": hf["transformer.ln_f.bias"],
    }
    pairs = {
        "attn_norm": "ln_1",
        "ffn_norm": "ln_2",
        "attn.qkv": "attn.c_attn",
        "attn.o_proj": "attn.c_proj",
        "ffn.up": "mlp.c_fc",
        "ffn.down": "mlp.c_proj",
    }
    for i in range(n_layers):
        for ours, theirs in pairs.items():
            w = hf[f"transformer.h.{i}.{theirs}.weight"]
            ref[f"layers.{i}.{ours}.weight"] = w if "norm" in ours else w.t()  # Conv1D: (in, out)
            ref[f"layers.{i}.{ours}.bias"] = hf[f"transformer.h.{i}.{theirs}.bias"]
    return ref


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert ours[name].is_contiguous(), name
        assert torch.equal(ours[name], tensor), name


def test_tiny_llama_matches_transformers(tiny_llama_dir: Path) -> None:
    ck = load_checkpoint(tiny_llama_dir)
    c = ck.config
    assert (c.arch, c.vocab_size, c.dim, c.n_layers) == ("llama", 49152, 64, 2)
    assert (c.n_heads, c.n_kv_heads) == (4, 2)
    assert (c.hidden_dim, c.max_seq_len, c.head_dim) == (128, 256, 16)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.attn_bias) == (
        50000.0,
        1e-6,
        False,
        False,
    )
    assert c.bos_token_id == 1
    assert c.eos_token_ids == [2, 0]  # config.json's 2, then generation_config.json's [2, 0]
    assert ck.tokenizer.eos_ids == [2, 0]
    assert ck.file_type == "safetensors-fp32"
    assert ck.original_bytes == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert ck.source == str(tiny_llama_dir.resolve())
    _assert_same(
        ck.state_dict, _llama_reference(_transformers_state(tiny_llama_dir), 2, False, False)
    )


def test_tiny_qwen2_has_qkv_bias_and_tied_embeddings(tiny_qwen2_dir: Path) -> None:
    ck = load_checkpoint(tiny_qwen2_dir)
    assert ck.config.attn_bias and ck.config.tie_embeddings
    assert "lm_head.weight" not in ck.state_dict
    ref = _llama_reference(_transformers_state(tiny_qwen2_dir), 2, tied=True, bias=True)
    _assert_same(ck.state_dict, ref)


def test_tiny_gpt2_transposes_conv1d(tiny_gpt2_dir: Path) -> None:
    ck = load_checkpoint(tiny_gpt2_dir)
    c = ck.config
    assert (c.arch, c.dim, c.n_heads, c.n_kv_heads) == ("gpt2", 64, 4, 4)
    assert (c.hidden_dim, c.max_seq_len) == (256, 64)
    assert c.tie_embeddings and c.norm_eps == 1e-5
    _assert_same(ck.state_dict, _gpt2_reference(_transformers_state(tiny_gpt2_dir), 2))


def test_sharded_checkpoint_loads_like_single_file(
    tiny_llama_dir: Path, tiny_llama_sharded_dir: Path
) -> None:
    shards = sorted(tiny_llama_sharded_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (tiny_llama_sharded_dir / "model.safetensors.index.json").is_file()
    sharded = load_checkpoint(tiny_llama_sharded_dir)
    single = load_checkpoint(tiny_llama_dir)
    _assert_same(sharded.state_dict, single.state_dict)
    assert sharded.original_bytes == sum(f.stat().st_size for f in shards)


def test_dtype_conversion(tiny_qwen2_dir: Path) -> None:
    ck = load_checkpoint(tiny_qwen2_dir, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in ck.state_dict.values())


def _config_only(tmp_path: Path, source: Path, **changes) -> Path:
    config = json.loads((source / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "bert"}, "model_type 'bert' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "RoPE scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ],
)
def test_unsupported_configs_are_refused(
    tmp_path: Path, tiny_llama_dir: Path, changes: dict, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        load_checkpoint(_config_only(tmp_path, tiny_llama_dir, **changes))


def test_missing_tokenizer_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_checkpoint(_config_only(tmp_path, tiny_llama_dir))


def test_missing_shard_is_refused(tmp_path: Path, tiny_llama_sharded_dir: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_sharded_dir, folder)
    victim = sorted(folder.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(UserError, match=f"lacks shard.*{victim.name}"):
        load_checkpoint(folder)


def test_missing_tensor_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing layers.1.ffn.gate_up.weight"):
        load_checkpoint(folder)
