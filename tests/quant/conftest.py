"""Fixtures for the quantization tests: a short real text. The tiny checkpoints and SmolLM2
fixtures (``tiny_llama_dir``, ``tiny_qwen2_dir``, ``smollm2_path``, ...) live in tests/conftest.py.

- ``sample_text_file``: a few KB of Tiny Shakespeare when the data dir has it, else a fixed text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
) * 8


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory: pytest.TempPathFactory, data_dir: Path | None) -> Path:
    """~3,000 characters of real text: Tiny Shakespeare's opening when available."""
    source = data_dir / "shakespeare" / "input.txt" if data_dir else None
    text = source.read_text()[:3000] if source and source.is_file() else FALLBACK_TEXT
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(text)
    return path
