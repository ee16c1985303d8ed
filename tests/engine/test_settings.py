"""EngineSettings: one record of engine options, keywords override it, unknown names are refused."""

import pytest
import torch

from mlsyskit.engine.settings import EngineSettings, parse_dtype
from mlsyskit.errors import UserError


def test_keywords_override_a_record_and_unknown_ones_are_named():
    base = EngineSettings(max_num_seqs=8, dtype="bf16")
    s = EngineSettings.build(base, block_size=32)
    assert (s.max_num_seqs, s.block_size, s.dtype) == (8, 32, "bf16")
    assert base.block_size == 16  # frozen: the record given is not changed
    with pytest.raises(TypeError, match="'max_num_seq'"):
        EngineSettings.build(base, who="LLM", max_num_seq=4)


def test_resolved_turns_names_into_dtypes():
    s = EngineSettings(dtype="bfloat16", kv_dtype="fp16").resolved()
    assert (s.dtype, s.kv_dtype) == (torch.bfloat16, torch.float16)
    assert EngineSettings().resolved().kv_dtype is None  # chosen by the engine from the weights
    assert parse_dtype("auto") is torch.float32
    with pytest.raises(UserError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


def test_engine_records_what_it_built(smollm2_checkpoint):
    from mlsyskit.engine import LLMEngine

    engine = LLMEngine(smollm2_checkpoint, EngineSettings(max_model_len=64, paged=False), max_num_seqs=2)
    s = engine.settings
    # paged=False: one block is a whole context, and prefix caching is off
    assert (s.block_size, s.prefix_caching, s.max_num_seqs) == (64, False, 2)
    assert s.num_kv_blocks == engine.block_manager.num_blocks >= 1
    assert s.kv_dtype == engine.kv_dtype == engine.kv_cache.k.dtype  # filled in from the weights
