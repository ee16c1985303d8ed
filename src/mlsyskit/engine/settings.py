"""What an engine is built with: one frozen record that ``LLM``, ``LLMEngine`` and the parallel
workers pass along, instead of each repeating the same long keyword list."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mlsyskit.errors import UserError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(d: torch.dtype | str | None) -> torch.dtype:
    """A dtype name as the CLI takes it; ``None``/``"auto"`` (native weights) computes in float32."""
    if d is None or d == "auto":
        return torch.float32
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise UserError(f"unknown dtype {d!r}; use float32, bfloat16 or auto (native GGUF blocks)")
    return _DTYPES[d]


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Every option of :class:`~mlsyskit.engine.llm_engine.LLMEngine` (and of ``LLM`` but the
    model and the parallel layout); see ``LLM``'s docstring for what each one does.

    ``dtype``/``kv_dtype`` may be names (``"bfloat16"``); :meth:`resolved` turns them into torch dtypes.
    """

    kv_cache: bool = True
    batching: str = "continuous"
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 512
    max_prefill_tokens: int = 16384
    max_num_seqs: int = 64
    prefix_caching: bool = True
    paged: bool = True
    max_model_len: int | None = None
    dtype: torch.dtype | str | None = None
    quantization: str | None = None
    kv_dtype: torch.dtype | str | None = None
    # KV tiers (mlsyskit.engine.kv_tiers)
    kv_offload: str | None = None
    kv_offload_gib: float = 4.0
    kv_disk_gib: float = 16.0
    kv_offload_dir: str | Path | None = None
    preemption: str = "auto"
    kv_tier_prefix: bool = True
    kv_prefetch: bool = True
    # speculative decoding (mlsyskit.engine.speculative)
    speculative: str | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1

    @classmethod
    def build(cls, base: EngineSettings | None = None, who: str = "LLMEngine", **options: Any) -> EngineSettings:
        """``base`` (or the defaults) with ``options`` replaced; an unknown option is a TypeError
        that names it, as a misspelled keyword argument would be."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"{who} got an unexpected option {unknown[0]!r}; its options: {', '.join(sorted(names))}")
        return dataclasses.replace(base or cls(), **options)

    def resolved(self) -> EngineSettings:
        """The same settings with ``dtype``/``kv_dtype`` as torch dtypes (``kv_dtype`` may stay None)."""
        kv = None if self.kv_dtype is None else parse_dtype(self.kv_dtype)
        return dataclasses.replace(self, dtype=parse_dtype(self.dtype), kv_dtype=kv)
