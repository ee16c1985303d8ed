"""GGUF: our dequantizer and loader against gguf-py's reference and transformers' loader."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import Checkpoint, load_checkpoint
from mlsyskit.models.gguf_loader import GGUFFile, dequantize

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def reader(smollm2_path: Path) -> GGUFFile:
    return GGUFFile(smollm2_path)


def _torch_shape(t) -> tuple[int, ...]:
    return tuple(reversed(t.shape))


def test_our_reader_reads_what_gguf_py_reads(reader: GGUFFile, smollm2_path: Path) -> None:
    ref = gguf.GGUFReader(smollm2_path)
    meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert reader.metadata == meta
    assert {k: type(v) for k, v in reader.metadata.items()} == {k: type(v) for k, v in meta.items()}
    assert [(t.name, t.tensor_type, t.shape) for t in reader.tensors] == [
        (t.name, t.tensor_type, tuple(t.shape.tolist())) for t in ref.tensors
    ]
    for ours, theirs in zip(reader.tensors, ref.tensors, strict=True):
        assert np.array_equal(ours.data, np.ascontiguousarray(theirs.data).reshape(-1).view(np.uint8))


def test_dequantize_is_bit_exact_on_every_smollm2_tensor(reader: GGUFFile) -> None:
    types = {t.tensor_type.name for t in reader.tensors}
    assert types == {"F32", "Q4_1", "Q8_0"}  # what this file holds
    for t in reader.tensors:
        ours = dequantize(t.data, t.tensor_type, _torch_shape(t)).numpy()
        ref = gguf_dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert np.array_equal(ours, ref), t.name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32])
def test_dequantize_other_types_on_real_weights(reader: GGUFFile, qtype: Q) -> None:
    # A real SmolLM2 weight (itself dequantized) re-quantized by gguf-py into each type.
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    weights = gguf_dequantize(t.data, t.tensor_type).astype(np.float32)
    if qtype == Q.F16:
        packed = weights.astype(np.float16)
    elif qtype == Q.F32:
        packed = weights
    else:
        packed = gguf_quantize(weights, qtype)
    ours = dequantize(packed, qtype, weights.shape).numpy()
    assert np.array_equal(ours, gguf_dequantize(packed, qtype).reshape(weights.shape))


def test_smollm2_config(smollm2_checkpoint: Checkpoint) -> None:
    c = smollm2_checkpoint.config
    assert (c.arch, c.vocab_size, c.dim, c.n_layers) == ("llama", 49152, 576, 30)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim) == (9, 3, 64, 1536)
    assert (c.rope_theta, c.norm_eps, c.max_seq_len) == (100000.0, 1e-5, 8192)
    assert c.tie_embeddings and not c.attn_bias
    assert c.bos_token_id == 1 and c.eos_token_ids == [2, 0]  # <|im_end|>, <|endoftext|>
    assert smollm2_checkpoint.file_type == "Q4_1"
    assert "lm_head.weight" not in smollm2_checkpoint.state_dict


@pytest.fixture(scope="module")
def transformers_tensors(smollm2_checkpoint: Checkpoint, smollm2_path: Path):
    """The tensors transformers' GGUF loader produces (its dequantizer and Q/K un-permute).

    ``from_pretrained(gguf_file=...)`` needs accelerate only to place the weights, so this
    calls the function it loads them with; the meta-device model only supplies names.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    c = smollm2_checkpoint.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        intermediate_size=c.hidden_dim,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # transformers rebuilds the same (pure, read-only) gguf name map once per submodule: ~400
    # times, 10+ s. Memoizing it changes nothing but the time.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        loaded = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=model)
    return loaded["tensors"]


def test_smollm2_matches_transformers(
    smollm2_checkpoint: Checkpoint, transformers_tensors: dict[str, torch.Tensor]
) -> None:
    hf = {k.removeprefix("model."): v.float() for k, v in transformers_tensors.items()}
    ref = {"embed.weight": hf.pop("embed_tokens.weight"), "norm.weight": hf.pop("norm.weight")}
    for i in range(smollm2_checkpoint.config.n_layers):
        h, o = f"layers.{i}.", f"layers.{i}."
        ref[o + "attn_norm.weight"] = hf.pop(h + "input_layernorm.weight")
        ref[o + "ffn_norm.weight"] = hf.pop(h + "post_attention_layernorm.weight")
        qkv = [hf.pop(f"{h}self_attn.{x}_proj.weight") for x in "qkv"]
        ref[o + "attn.qkv.weight"] = torch.cat(qkv)
        ref[o + "attn.o_proj.weight"] = hf.pop(h + "self_attn.o_proj.weight")
        gate_up = [hf.pop(f"{h}mlp.{x}_proj.weight") for x in ("gate", "up")]
        ref[o + "ffn.gate_up.weight"] = torch.cat(gate_up)
        ref[o + "ffn.down.weight"] = hf.pop(h + "mlp.down_proj.weight")
    assert not hf  # every transformers tensor has its counterpart
    ours = smollm2_checkpoint.state_dict
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=0, msg=name)


def test_truncated_gguf_is_refused(tmp_path: Path, smollm2_path: Path) -> None:
    with open(smollm2_path, "rb") as src:
        head = src.read(1 << 20)  # cut inside the vocabulary metadata
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(UserError, match="cut.gguf is not a valid GGUF file"):
        load_checkpoint(tmp_path / "cut.gguf")


def test_gguf_without_tensor_data_is_refused(tmp_path: Path, smollm2_path: Path) -> None:
    with open(smollm2_path, "rb") as src:
        head = src.read(smollm2_path.stat().st_size // 2)  # metadata intact, weights cut
    (tmp_path / "half.gguf").write_bytes(head)
    with pytest.raises(UserError, match="half.gguf"):
        load_checkpoint(tmp_path / "half.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"GGML" + bytes(1000))
    with pytest.raises(UserError, match="not a valid GGUF file"):
        load_checkpoint(tmp_path / "junk.gguf")


def _convert_like_llama_cpp(hf_dir: Path, arch: str, out: Path, tokenizer_meta: dict) -> Path:
    """Write a HF checkpoint as GGUF the way llama.cpp's convert_hf_to_gguf.py does: gguf-py's
    tensor names, Q/K rows permuted for llama, GPT-2's Conv1D weights transposed; F32 data."""
    from safetensors.torch import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(out, arch)
    if arch == "gpt2":
        n_layers, n_heads = hf["n_layer"], hf["n_head"]
        w.add_context_length(hf["n_positions"])
        w.add_embedding_length(hf["n_embd"])
        w.add_feed_forward_length(4 * hf["n_embd"])
        w.add_layer_norm_eps(hf["layer_norm_epsilon"])
    else:
        n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        w.add_context_length(hf["max_position_embeddings"])
        w.add_embedding_length(hf["hidden_size"])
        w.add_feed_forward_length(hf["intermediate_size"])
        w.add_head_count_kv(hf["num_key_value_heads"])
        w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
        w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    w.add_block_count(n_layers)
    w.add_head_count(n_heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's LlamaModel.permute
        return (
            t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
            .swapaxes(1, 2)
            .reshape(t.shape)
        )

    for name, t in tensors.items():
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = permute(t, n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = permute(t, hf["num_key_value_heads"])
        elif arch == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        w.add_tensor(
            names.get_name(name, try_suffixes=(".weight", ".bias")), t.contiguous().numpy()
        )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_meta["tokenizer.ggml.pre"])
    w.add_token_list(tokenizer_meta["tokenizer.ggml.tokens"])
    w.add_token_types(tokenizer_meta["tokenizer.ggml.token_type"])
    w.add_token_merges(tokenizer_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer_meta["tokenizer.chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize(
    ("fixture", "arch"),
    [("tiny_llama_dir", "llama"), ("tiny_qwen2_dir", "qwen2"), ("tiny_gpt2_dir", "gpt2")],
)
def test_converted_tiny_checkpoints_load_like_their_hf_originals(
    request: pytest.FixtureRequest, reader: GGUFFile, tmp_path: Path, fixture: str, arch: str
) -> None:
    hf_dir: Path = request.getfixturevalue(fixture)
    meta = {k: v for k, v in reader.metadata.items() if k.startswith("tokenizer.")}
    path = _convert_like_llama_cpp(hf_dir, arch, tmp_path / f"{arch}.gguf", meta)
    from_gguf, from_hf = load_checkpoint(path), load_checkpoint(hf_dir)
    assert from_gguf.file_type == "F32"
    ours, want = from_gguf.config.to_dict(), from_hf.config.to_dict()
    ours.pop("eos_token_ids"), want.pop("eos_token_ids")
    assert ours == want
    assert sorted(from_gguf.state_dict) == sorted(from_hf.state_dict)
    for name, tensor in from_hf.state_dict.items():
        assert torch.equal(from_gguf.state_dict[name], tensor), name
