"""LLM inference engine: paged KV cache, continuous batching, chunked prefill, preemption.

``from mlsyskit.engine import LLM, SamplingParams``. Names are imported on first use so that
``mlsyskit --help`` (which imports ``mlsyskit.engine.cli``) does not load torch.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "LLM": "mlsyskit.engine.llm",
    "LLMEngine": "mlsyskit.engine.llm_engine",
    "EngineSettings": "mlsyskit.engine.settings",
    "SamplingParams": "mlsyskit.engine.sampling",
    "RequestOutput": "mlsyskit.engine.outputs",
    "Checkpoint": "mlsyskit.engine.llm",
    "load_checkpoint": "mlsyskit.engine.llm",
    "default_model_path": "mlsyskit.engine.llm",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
