"""Tiny GGUF files with block-quantized weights, written the way llama.cpp's converter and
quantizer do (gguf-py's writer and quantizers, Q/K rows permuted for llama), from the tiny HF
checkpoints of tests/conftest.py: the native (block) path on every format in a second."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mlsyskit.models.gguf_loader import GGUFFile


def write_quantized_gguf(hf_dir: Path, arch: str, out: Path, tokenizer_meta: dict) -> Path:
    """attention weights as Q4_0, feed-forward as Q4_1, embedding and output as Q8_0, the rest
    (norms, biases) F32."""
    from safetensors.torch import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    n_layers, n_heads, n_kv = hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(out, arch)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"])
    w.add_block_count(n_layers)
    w.add_head_count(n_heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's LlamaModel.permute
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    for name, t in tensors.items():
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = permute(t, n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = permute(t, n_kv)
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = t.float().contiguous().numpy()
        if data.ndim == 2:
            qtype = Q.Q8_0 if "embd" in gname or gname.startswith("output") else Q.Q4_0 if ".attn_" in gname else Q.Q4_1
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)
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


@pytest.fixture(scope="session")
def _tokenizer_meta(smollm2_path: Path) -> dict:
    return {k: v for k, v in GGUFFile(smollm2_path).metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def tiny_llama_q_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, _tokenizer_meta: dict) -> Path:
    """The tiny Llama (untied head, Q/K permuted in the file) as Q4_0 / Q4_1 / Q8_0."""
    return write_quantized_gguf(tiny_llama_dir, "llama", tmp_path_factory.mktemp("tiny_q") / "llama.gguf", _tokenizer_meta)


@pytest.fixture(scope="session")
def tiny_qwen2_q_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path, _tokenizer_meta: dict) -> Path:
    """The tiny Qwen2 (q/k/v biases, embedding tied to the head) as Q4_0 / Q4_1 / Q8_0."""
    return write_quantized_gguf(tiny_qwen2_dir, "qwen2", tmp_path_factory.mktemp("tiny_q") / "qwen2.gguf", _tokenizer_meta)


def np_view_of_file(a: np.ndarray) -> bool:
    """Whether ``a`` is a read-only view (no copy) of a memory-mapped file."""
    import mmap

    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return isinstance(a, mmap.mmap) or isinstance(getattr(a, "obj", None), mmap.mmap)
