"""Spec files: the Q11 example's derived capacities by hand, and one-line errors for bad specs."""

from __future__ import annotations

import pytest

from mlsyskit.cluster.spec import GIB, load_spec
from mlsyskit.errors import UserError


def test_q11_capacities_by_hand(q11_path) -> None:
    spec = load_spec(q11_path)
    names = [i.name for i in spec.instances]
    assert names == ["c1", "c2", "c3", "c4-tp2"]
    kv = 114_688  # bytes per token of the 3B model
    w = spec.model.weight_bytes
    # 8 GiB x 0.92 - weights - 0.25 GiB reserve, in blocks of 16 tokens
    small = int((8 * GIB * 0.92 - w - 0.25 * GIB) // (kv * 16))
    # the TP pair: each 12 GiB GPU holds half the weights and half of every token's KV
    big = int((12 * GIB * 0.92 - w / 2 - 0.25 * GIB) // (kv / 2 * 16))
    assert [i.num_blocks for i in spec.instances] == [small, small, small, big]
    assert spec.instances[0].max_model_len == small * 16  # the context is cut to what the KV holds
    assert spec.instances[3].max_model_len == 32768 and spec.instances[3].tp == 2
    assert spec.entry == "c1" and spec.network.bandwidth == 0.125e9 and spec.network.latency == pytest.approx(200e-6)
    # the 7B example on one 16 GiB GPU loads too
    seven = load_spec(q11_path.parent / "llama7b_16gb.toml")
    assert len(seven.instances) == 1 and seven.model.params > 6.5e9 and seven.instances[0].num_blocks > 0


def test_default_instances_one_per_gpu(make_spec, toy_text) -> None:
    text = toy_text + """
[gpu.g]
memory_gib = 1
tflops = 1
bandwidth_gb_s = 1
[[node]]
name = "n"
gpus = ["g", "g"]
"""
    spec = make_spec(text)
    assert [i.name for i in spec.instances] == ["n:0", "n:1"] and all(i.tp == 1 for i in spec.instances)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"engine": {"max_num_seqs": 600, "max_num_batched_tokens": 512}}, "max_num_seqs"),
        ({"gpu": {"g8": {"memory_gib": 4, "tflops": 40, "bandwidth_gb_s": 448},
                  "g12": {"memory_gib": 12, "tflops": 58, "bandwidth_gb_s": 504}}}, "does not fit"),
        ({"instance": [{"gpus": ["a:0", "b:0"]}]}, "across nodes"),
        ({"instance": [{"gpus": ["a:3"]}]}, "no GPU"),
        ({"instance": [{"gpus": ["a:0"]}, {"gpus": ["a:0"]}]}, "two instances"),
        ({"cost": {"mfu": 1.5}}, "at most 1"),
        ({"slo": {"ttft": 1}}, "unknown key"),
        ({"network": {"bandwidth_gb_s": 1, "latency_us": 1, "entry": "nowhere"}}, "entry"),
        ({"engine": {"admission": "eager"}}, "admission"),
    ],
)
def test_bad_specs_are_user_errors(change: dict, message: str, make_spec, small_text) -> None:
    with pytest.raises(UserError, match=message):
        make_spec(small_text, **change)


def test_bad_files(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_spec(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_spec(bad)
    bad.write_text("name = 'x'\n")
    with pytest.raises(UserError, match=r"bad\.toml: \[model\] is missing"):
        load_spec(bad)
