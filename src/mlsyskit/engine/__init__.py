"""LLM inference engine: paged KV cache, continuous batching, chunked prefill, preemption.

``from mlsyskit.engine import LLM, SamplingParams``. Names are imported on first use so that
``mlsyskit --help`` (which imports ``mlsyskit.engine.cli``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "mlsyskit.engine.llm",
    "LLMEngine": "mlsyskit.engine.llm_engine",
    "SamplingParams": "mlsyskit.engine.sampling",
    "RequestOutput": "mlsyskit.engine.outputs",
    "Checkpoint": "mlsyskit.engine.checkpoint",
    "load_checkpoint": "mlsyskit.engine.checkpoint",
    "default_model_path": "mlsyskit.engine.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlsyskit.engine' has no attribute {name!r}")
