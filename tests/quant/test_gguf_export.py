"""`mlsyskit export-gguf`: read back by our loader, by gguf-py's reader, and by llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import load_checkpoint
from mlsyskit.models.transformer import build_transformer
from mlsyskit.quant.gguf_export import export_gguf, to_blocks
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig
from mlsyskit.quant.model_io import quantize_checkpoint
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import QuantizedTensor, quantize_tensor

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_gpt2_dir"])
def test_f32_export_reloads_exactly(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue(fixture)
    summary = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert summary["tensor_types"] == {"F32": len(gguf.GGUFReader(tmp_path / "m.gguf").tensors)}
    a, b = load_checkpoint(src), load_checkpoint(tmp_path / "m.gguf")
    ca, cb = a.config.to_dict(), b.config.to_dict()
    # a GGUF's end-of-turn control tokens (<|endoftext|>) join its EOS ids, as llama.cpp does
    assert cb.pop("eos_token_ids")[:1] == ca.pop("eos_token_ids")[:1] and ca == cb
    assert sorted(a.state_dict) == sorted(b.state_dict)
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k  # split, permuted and fused back: bit-exact
    assert a.tokenizer.encode(TEXT) == b.tokenizer.encode(TEXT)
    assert (a.tokenizer.bos_id, a.tokenizer.eos_ids[:1]) == (b.tokenizer.bos_id, b.tokenizer.eos_ids[:1])


def test_gguf_py_reads_the_export(tiny_llama_dir: Path, tmp_path: Path) -> None:
    export_gguf(tiny_llama_dir, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    # this tokenizer.json (transformers' conversion of SmolLM2's GGUF) splits like GPT-2
    assert meta["llama.attention.head_count_kv"] == 2 and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == load_checkpoint(tiny_llama_dir).config.vocab_size
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    ours = load_checkpoint(tmp_path / "m.gguf").state_dict["layers.1.ffn.down.weight"]
    theirs = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    assert np.array_equal(ours.numpy(), gguf_dequantize(theirs.data, theirs.tensor_type).reshape(ours.shape))


def test_tokenizer_metadata_rebuilt_from_the_tokenizer(smollm2_path: Path) -> None:
    from mlsyskit.models.gguf_export import tokenizer_metadata
    from mlsyskit.models.gguf_loader import GGUFFile

    ckpt = load_checkpoint(smollm2_path)
    rebuilt = tokenizer_metadata(ckpt.tokenizer, ckpt.config.vocab_size)  # not copied from the file
    orig = GGUFFile(smollm2_path).metadata
    for key in ("pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
        assert rebuilt[f"tokenizer.ggml.{key}"] == orig[f"tokenizer.ggml.{key}"], key
    assert rebuilt["tokenizer.chat_template"] == orig["tokenizer.chat_template"]


@pytest.mark.parametrize(
    "scheme, qtype, exact",
    [
        (QuantScheme(bits=8, granularity="channel"), "Q8_0", True),
        (QuantScheme(bits=8, granularity="group", group_size=64), "Q8_0", True),
        (QuantScheme(bits=4, granularity="group", group_size=32), "Q4_0", True),
        (QuantScheme(bits=4, granularity="group", group_size=96, symmetric=False), "Q4_1", False),
    ],
)
def test_blocks_mean_what_our_codes_mean(scheme: QuantScheme, qtype: str, exact: bool) -> None:
    w = torch.randn(16, 192) * torch.linspace(0.1, 3, 192)
    qt = quantize_tensor(w, scheme)
    blocks = to_blocks(qt)
    assert blocks is not None and blocks.qtype.name == qtype
    got = gguf_dequantize(blocks.data, blocks.qtype).reshape(16, 192)
    want = qt.dequantize().numpy()
    if exact:
        assert np.array_equal(got, want)
    else:  # the minimum -S Z is rounded to float16
        bound = (qt.scale * qt.zero).abs().max().item() * 2.0**-11
        assert 0 < np.abs(got - want).max() <= bound


def test_no_block_format_for_asymmetric_8_or_3_bits() -> None:
    w = torch.randn(4, 64)
    assert to_blocks(quantize_tensor(w, QuantScheme(bits=8, symmetric=False))) is None
    assert to_blocks(quantize_tensor(w, QuantScheme(bits=3, granularity="group", group_size=32))) is None


def test_native_export_of_a_quantized_directory(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = WeightOnlyConfig(QuantScheme(bits=4, granularity="group", group_size=32))
    qdir = tmp_path / "q4"
    quantize_checkpoint(tiny_llama_dir, qdir, config)
    summary = export_gguf(qdir, tmp_path / "q4.gguf", "native")
    assert set(summary["tensor_types"]) == {"Q4_0", "F32"}
    ours = load_checkpoint(qdir).state_dict
    back = load_checkpoint(tmp_path / "q4.gguf").state_dict
    for k, v in ours.items():
        want = v.dequantize() if isinstance(v, QuantizedTensor) else v
        assert torch.equal(back[k], want), k


def test_export_refuses_an_existing_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(tiny_llama_dir, tmp_path / "x.gguf")
    r = subprocess.run([sys.executable, "-m", "mlsyskit.cli", "export-gguf", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mlsyskit.cli", "export-gguf", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "y.gguf"), "--dtype", "f16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["file_bytes"] == (tmp_path / "y.gguf").stat().st_size


@pytest.mark.parametrize("dtype", ["f32", "native"])
def test_llama_cpp_computes_the_same_logits(tiny_llama_dir: Path, tmp_path: Path, dtype: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")  # `make bench-deps` builds it; CI's `make test` does not
    src: Path = tiny_llama_dir
    if dtype == "native":  # our int8 weights as Q8_0 blocks
        src = tmp_path / "q8"
        quantize_checkpoint(tiny_llama_dir, src, WeightOnlyConfig(QuantScheme(bits=8, granularity="channel")))
    path = tmp_path / "m.gguf"
    export_gguf(src, path, dtype)
    ckpt = load_checkpoint(src)
    model = build_transformer(ckpt.config, ckpt.state_dict, quantized_linear=QuantLinear)
    ids = ckpt.tokenizer.encode(TEXT)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    # llama.cpp multiplies Q8_0 weights by activations it rounds to 8 bits too: ~1 % of the range
    tol = 2e-3 if dtype == "f32" else 2e-2
    assert np.abs(theirs - ours).max() < tol * np.abs(ours).max()
    assert (theirs.argmax(1) == ours.argmax(1)).mean() > 0.9
