"""The simulated twin of replicas on one machine (cluster.local): built from a calibrated
one-instance spec and `--replica-spec` texts, as benchmarks/cluster_replicas.py builds it."""

from __future__ import annotations

import tomllib

import pytest

from mlsyskit.cluster.local import local_cluster, speed_factors
from mlsyskit.cluster.policies import make_policy
from mlsyskit.cluster.routing import parse_replica_spec
from mlsyskit.cluster.sim import simulate
from mlsyskit.cluster.spec import spec_from_dict
from mlsyskit.cluster.workload import Workload
from mlsyskit.errors import UserError

# What `mlsyskit cluster calibrate` writes, for a SmolLM2-135M-shaped model by hand.
CALIBRATED = """
name = "this-machine"
[model]
n_layers = 30
hidden = 576
n_heads = 9
n_kv_heads = 3
head_dim = 64
intermediate = 1536
vocab = 49152
tied_embeddings = true
dtype = "fp32"
max_context = 8192
[gpu.cpu]
memory_gib = 1.5
tflops = 0.9
bandwidth_gb_s = 4
[[node]]
name = "host"
gpus = ["cpu"]
[engine]
max_num_batched_tokens = 512
gpu_memory_utilization = 1.0
reserve_gib = 0
num_kv_blocks = 1000
[cost]
mfu = 1.0
mbu = 1.0
step_overhead_ms = 15
token_overhead_us = 900
kv_overhead_ns = 300
"""

SMALL, LARGE = "threads=1,kv=1024,ctx=1024", "threads=1,kv=8192,ctx=2048"


@pytest.fixture
def base():
    return spec_from_dict(tomllib.loads(CALIBRATED))


def test_each_replica_spec_becomes_an_instance_with_its_kv_and_context(base) -> None:
    reps = [parse_replica_spec(t) for t in (SMALL, SMALL, LARGE)]
    spec = local_cluster(base, reps, cores=2, calibrated_threads=1)
    assert [i.kv_tokens for i in spec.instances] == [1024, 1024, 8192]
    assert [i.max_model_len for i in spec.instances] == [1024, 1024, 2048]
    assert spec.model.weight_bytes == base.model.weight_bytes
    # 3 one-thread replicas on 2 cores: each at 2/3 of the calibrated one-thread speed
    ref = base.instances[0].cost
    for inst in spec.instances:
        assert inst.cost.decode_run_time(2, 300, 10) == pytest.approx(1.5 * ref.decode_run_time(2, 300, 10), rel=1e-9)
        assert inst.cost.step_time(250, 1, 31375, 0, 1) == pytest.approx(1.5 * ref.step_time(250, 1, 31375, 0, 1), rel=1e-9)


def test_speed_follows_threads_and_the_share_of_the_cores(base) -> None:
    assert speed_factors([parse_replica_spec("threads=2"), parse_replica_spec("threads=1")], 4, 2) == [1.0, 0.5]
    assert speed_factors([parse_replica_spec("threads=2")] * 2, 2, 2) == [0.5, 0.5]  # 4 threads on 2 cores
    spec = local_cluster(base, [parse_replica_spec("threads=2"), parse_replica_spec("threads=1")], cores=4, calibrated_threads=1)
    fast, slow = (i.cost.decode_run_time(1, 100, 20) for i in spec.instances)
    assert slow == pytest.approx(2 * fast, rel=1e-9)
    unbounded = local_cluster(base, [parse_replica_spec("threads=1")], cores=1, calibrated_threads=1)
    assert unbounded.instances[0].num_blocks == base.instances[0].num_blocks


def test_length_class_on_the_twin_sends_long_requests_to_the_large_replica(base) -> None:
    reps = [parse_replica_spec(t) for t in (SMALL, SMALL, LARGE)]
    spec = local_cluster(base, reps, cores=2, calibrated_threads=1)
    n = 40
    long = [i % 4 == 0 for i in range(n)]
    wl = Workload([0.5 * i for i in range(n)], [260 if x else 25 for x in long], [48 if x else 12 for x in long],
                  ["long" if x else "short" for x in long])
    lc = simulate(spec, wl, make_policy("length-class"))
    assert all(lc.instance[i] == 2 for i in range(n) if long[i])
    assert all(lc.instance[i] in (0, 1) for i in range(n) if not long[i])
    assert sorted(lc.status) == ["done"] * n
    rr = simulate(spec, wl, make_policy("round-robin"))
    assert [rr.instance.count(k) for k in range(3)] == [14, 13, 13]


def test_a_spec_that_is_not_one_calibrated_instance_is_refused(base, small_spec) -> None:
    with pytest.raises(UserError, match="one single-GPU instance"):
        local_cluster(small_spec, [parse_replica_spec(SMALL)], cores=2, calibrated_threads=1)
    with pytest.raises(UserError, match="no replicas"):
        local_cluster(base, [], cores=2, calibrated_threads=1)
