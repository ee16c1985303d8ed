"""Small specs for the simulator tests (built from the TOML text a user would write)."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlsyskit.cluster.spec import Spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
Q11 = ROOT / "examples" / "q11.toml"

# A toy model whose counts are easy by hand: 1 layer, hidden 4, 1 head of 4, MLP 8, vocab 10.
TOY_MODEL = """
[model]
name = "toy"
n_layers = 1
hidden = 4
n_heads = 1
n_kv_heads = 1
head_dim = 4
intermediate = 8
vocab = 10
tied_embeddings = true
dtype = "fp16"
max_context = 4096
"""

# Two unequal single-GPU nodes and a TP pair, a Llama-3.2-3B-shaped model: memory pressure
# with a few requests.
SMALL = """
name = "small"
[model]
n_layers = 28
hidden = 3072
n_heads = 24
n_kv_heads = 8
head_dim = 128
intermediate = 8192
vocab = 128256
dtype = "fp16"
max_context = 32768

[gpu.g8]
memory_gib = 8
tflops = 40
bandwidth_gb_s = 448
[gpu.g12]
memory_gib = 12
tflops = 58
bandwidth_gb_s = 504

[[node]]
name = "a"
gpus = ["g8"]
[[node]]
name = "b"
gpus = ["g8"]
[[node]]
name = "big"
gpus = ["g12", "g12"]
link = { bandwidth_gb_s = 100, latency_us = 5 }

[network]
bandwidth_gb_s = 0.125
latency_us = 200
entry = "a"

[[instance]]
name = "a"
gpus = ["a:0"]
[[instance]]
name = "b"
gpus = ["b:0"]
[[instance]]
name = "big"
gpus = ["big:0", "big:1"]

[engine]
max_num_batched_tokens = 2048
admission = "whole"

[cost]
kv_overhead_ns = 0.5   # exercised by the fast-forward test

[workload]
rate = 2.0
requests = 300
seed = 3
[[workload.class]]
name = "short"
weight = 0.7
prompt = { dist = "lognormal", mean = 250, sigma = 0.7, min = 16, max = 1000 }
output = { dist = "lognormal", mean = 150, sigma = 0.7, min = 8, max = 600 }
[[workload.class]]
name = "long-generation"
weight = 0.15
prompt = { dist = "lognormal", mean = 250, sigma = 0.7, min = 16, max = 1000 }
output = { dist = "uniform", min = 3000, max = 6000 }
[[workload.class]]
name = "long-context"
weight = 0.15
prompt = { dist = "uniform", min = 4000, max = 7000 }
output = { dist = "uniform", min = 100, max = 800 }

[slo]
ttft_s = 3.0
tpot_s = 0.1

[policy]
short_max = 1024
long_min = 4096
"""


def _make_spec(text: str, **overrides: Any) -> Spec:
    raw = tomllib.loads(text)
    for key, value in overrides.items():
        raw[key] = value
    return spec_from_dict(raw)


@pytest.fixture
def make_spec() -> Callable[..., Spec]:
    """make_spec(TOML text, **top-level tables to replace) -> Spec."""
    return _make_spec


@pytest.fixture
def small_text() -> str:
    return SMALL


@pytest.fixture
def toy_text() -> str:
    return TOY_MODEL


@pytest.fixture
def q11_path() -> Path:
    return Q11


@pytest.fixture
def small_spec() -> Spec:
    return _make_spec(SMALL)
