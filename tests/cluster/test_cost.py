"""The model counts and the roofline cost model against hand-computed cases."""

from __future__ import annotations

import json
import random

import pytest

from mlsyskit.cluster.cost import CostParams, InstanceCost, Link, _sum_max_lines
from mlsyskit.cluster.model import (
    ModelSpec,
    model_from_gguf,
    model_from_hf_config,
    model_from_table,
)
from mlsyskit.errors import UserError


def toy() -> ModelSpec:
    # 1 layer, hidden 4, 1 head of 4, 1 KV head, MLP 8 (gated), vocab 10, tied, fp16
    return ModelSpec("toy", n_layers=1, hidden=4, n_heads=1, n_kv_heads=1, head_dim=4, intermediate=8, vocab=10)


def test_toy_model_counts_by_hand() -> None:
    m = toy()
    # q + o: 2*4*4 = 32; k + v: 2*4*4 = 32; gated MLP 3*4*8 = 96; two norms 8 -> 168
    assert m.layer_params == 168
    assert m.params == 168 + 10 * 4 + 4  # + tied embedding + final norm = 212
    assert m.weight_bytes == 424  # fp16
    assert m.kv_bytes_per_token == 2 * 1 * 1 * 4 * 2  # k and v, 1 layer, 1 head of 4, fp16 = 16
    assert m.linear_flops_per_token == 2 * (168 - 8)  # matmul weights only: 320
    assert m.head_flops_per_token == 2 * 4 * 10
    assert m.attn_flops_per_pair == 4 * 1 * 1 * 4


def test_llama_3b_shape_counts() -> None:
    m = model_from_table({"n_layers": 28, "hidden": 3072, "n_heads": 24, "n_kv_heads": 8, "head_dim": 128,
                          "intermediate": 8192, "vocab": 128256, "tied_embeddings": True, "dtype": "fp16"})
    # Llama-3.2-3B: 3,212,749,824 parameters; 28 layers x 8 KV heads x 128 x 2 (k, v) x 2 bytes
    assert m.params == 3_212_749_824
    assert m.kv_bytes_per_token == 114_688
    assert m.weight_bytes / 2**30 == pytest.approx(5.984, abs=1e-3)  # the "6 GB per instance"


def test_step_time_by_hand() -> None:
    params = CostParams(mfu=1.0, mbu=1.0, step_overhead_s=0.0)
    c = InstanceCost(toy(), flops=1000.0, bandwidth=100.0, tp=1, params=params)
    # one decode token at 10 cached tokens: compute (320 + 80 + 16 * 11) / 1000 = 0.576 s,
    # memory (424 weights + (10 read + 1 written) * 16) / 100 = 6.0 s -> memory-bound
    assert c.step_time(1, 1, 11, 10, 1) == pytest.approx(6.0)
    b = c.breakdown(1, 1, 11, 10, 1)
    assert b["compute_s"] == pytest.approx(0.576) and b["memory_s"] == pytest.approx(6.0)
    # a 100-token prefill chunk: compute (100 * 320 + 80 + 16 * 5050) / 1000 = 112.88 s, compute-bound
    assert InstanceCost.prefill_pairs(0, 100) == 5050
    assert c.step_time(100, 1, 5050, 0, 1) == pytest.approx(112.88)
    # overheads add: 1 s a step, 0.5 s a sequence, 0.25 s a token, 0.01 s a cached token read
    c2 = InstanceCost(toy(), 1000.0, 100.0, 1, CostParams(1.0, 1.0, 1.0, 0.5, 0.25, 0.01))
    assert c2.step_time(1, 1, 11, 10, 1) == pytest.approx(6.0 + 1.0 + 0.5 + 0.25 + 0.1)


def test_tensor_parallel_step_by_hand() -> None:
    params = CostParams(mfu=1.0, mbu=1.0, step_overhead_s=0.0)
    link = Link(bandwidth=8.0, latency=0.5)
    c = InstanceCost(toy(), flops=1000.0, bandwidth=100.0, tp=2, params=params, tp_link=link)
    # compute and memory halve (0.288, 3.0); 2 ring all-reduces per layer, each
    # 2 (tp-1) latencies = 1.0 s plus 2 (tp-1)/tp * 8 bytes / 8 B/s = 1.0 s per token -> 4.0 s
    assert c.step_time(1, 1, 11, 10, 1) == pytest.approx(3.0 + 4.0)
    with pytest.raises(ValueError):
        InstanceCost(toy(), 1000.0, 100.0, 2, params)


def test_decode_run_time_is_the_sum_of_its_steps() -> None:
    """The closed form equals summing step_time, on both sides of the compute/memory crossover."""
    rng = random.Random(0)
    for flops, bw in ((1e6, 1e9), (1e4, 1e3), (3e3, 250.0)):
        c = InstanceCost(toy(), flops, bw, 1, CostParams(0.7, 0.9, 0.01, 0.001, 0.0001, 2e-6))
        for _ in range(50):
            d, ctx, k = rng.randint(1, 40), rng.randint(0, 5000), rng.randint(1, 300)
            direct = sum(c.step_time(d, d, ctx + i * d + d, ctx + i * d, d) for i in range(k))
            assert c.decode_run_time(d, ctx, k) == pytest.approx(direct, rel=1e-9)
            e = rng.random() * direct
            j = c.decode_steps_done(d, ctx, k, e)
            assert c.decode_run_time(d, ctx, j) >= e - 1e-12 and (j == 1 or c.decode_run_time(d, ctx, j - 1) < e)


def test_sum_of_max_of_two_lines() -> None:
    # max(10 - i, 2 + i) for i = 0..9: 10, 9, 8, 7, 6, 7, 8, 9, 10, 11
    assert _sum_max_lines(10, -1, 2, 1, 10) == 85
    assert _sum_max_lines(1, 0, 1, 0, 4) == 4


def test_hf_config_json(tmp_path) -> None:
    cfg = {"model_type": "llama", "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "vocab_size": 128256,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16", "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = model_from_hf_config(tmp_path)
    assert m.params == 3_212_749_824 and m.kv_bytes_per_token == 114_688 and m.max_context == 131072
    m2 = model_from_table({"config": "config.json", "max_context": 8192, "weight_gib": 6}, base_dir=tmp_path)
    assert m2.max_context == 8192 and m2.weight_bytes == 6 * 2**30
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        model_from_hf_config(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        model_from_hf_config(tmp_path / "missing.json")


def test_gguf_metadata_of_the_embedded_smollm2(smollm2_path) -> None:
    m = model_from_gguf(smollm2_path)
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads of 64, MLP 1536, vocab 49152
    assert (m.n_layers, m.hidden, m.n_heads, m.n_kv_heads, m.head_dim, m.intermediate, m.vocab) == (30, 576, 9, 3, 64, 1536, 49152)
    assert m.params == 134_515_008
    size = smollm2_path.stat().st_size  # the tensors as stored (Q4_1) plus metadata and vocabulary
    assert 0.9 * size < m.weight_bytes < size
    assert m.max_context == 8192 and m.tied_embeddings


def test_not_a_gguf_file(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(UserError, match="bad magic"):
        model_from_gguf(bad)
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(UserError, match="truncated"):
        model_from_gguf(bad)


def test_bad_model_tables() -> None:
    with pytest.raises(UserError, match="missing"):
        model_from_table({"n_layers": 2})
    with pytest.raises(UserError, match="unknown key"):
        model_from_table({"n_layer": 2})
    with pytest.raises(UserError, match="multiple"):
        model_from_table({"n_layers": 2, "hidden": 8, "n_heads": 3, "n_kv_heads": 2, "intermediate": 8, "vocab": 4})
