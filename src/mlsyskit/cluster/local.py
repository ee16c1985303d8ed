"""Replicas on one machine as a simulated cluster: the twin of ``mlsyskit serve --replicas N
--replica-spec SPEC...`` (or ``mlsyskit router --replica-spec`` over N ``mlsyskit serve``
workers), so the simulator's prediction can be set beside a measured run.

The step times come from a calibrated one-instance spec (``mlsyskit cluster calibrate`` writes
one, measured with ``calibrated_threads`` torch threads). Each replica becomes one instance on a
node of its own, with the replica's KV budget (``kv`` tokens: ``kv // 16`` blocks, as the worker
gets ``--num-kv-blocks``) and context (``ctx``), and its step times scaled by its share of the
CPU: a replica of ``t`` threads, among replicas of ``T`` threads in all on ``C`` cores, runs at
``t / calibrated_threads * min(1, C / T)`` of the calibrated speed. That is linear scaling in
threads and a fair share of oversubscribed cores, whatever the others are doing: an
assumption (an idle replica leaves its core to the busy ones in reality), which the
``benchmarks/cluster_replicas.py`` comparison measures. The nodes are joined by a loopback-fast
link (the router and the replicas share the machine).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from mlsyskit.cluster.routing import UNBOUNDED, ReplicaSpec
from mlsyskit.cluster.spec import GIB, SLO, Spec, spec_from_dict
from mlsyskit.errors import UserError

LOOPBACK = {"bandwidth_gb_s": 10.0, "latency_us": 50.0}


def speed_factors(replicas: Sequence[ReplicaSpec], cores: int, calibrated_threads: float) -> list[float]:
    """Each replica's speed relative to the calibrated instance (see the module docs)."""
    if cores < 1 or calibrated_threads <= 0:
        raise UserError(f"need cores >= 1 and calibrated threads > 0, got {cores} and {calibrated_threads}")
    total = sum(r.threads for r in replicas)
    share = min(1.0, cores / total) if total > 0 else 1.0
    return [r.threads / calibrated_threads * share for r in replicas]


def local_cluster(base: Spec, replicas: Sequence[ReplicaSpec], *, cores: int, calibrated_threads: float,
                  slo: SLO | None = None, workload: dict[str, Any] | None = None, name: str = "local-replicas") -> Spec:
    """The spec of ``replicas`` on this machine from the calibrated one-instance spec ``base``."""
    if len(base.instances) != 1 or base.instances[0].tp != 1:
        raise UserError(f"{base.name}: a calibrated spec has one single-GPU instance, got {len(base.instances)}")
    if not replicas:
        raise UserError("no replicas to simulate")
    inst = base.instances[0]
    gpu = inst.gpus[0]
    block = inst.engine.block_size
    model = base.model
    raw = copy.deepcopy(base.raw)
    for key in ("gpu", "node", "instance", "network"):
        raw.pop(key, None)
    raw["name"] = name
    raw["engine"] = {**raw.get("engine", {}), "gpu_memory_utilization": 1.0, "reserve_gib": 0.0}
    raw["engine"].pop("num_kv_blocks", None)
    raw["engine"].pop("max_model_len", None)
    raw["gpu"], raw["node"], raw["instance"] = {}, [], []
    for i, r in enumerate(replicas):
        blocks = max(1, r.kv_tokens // block) if r.kv_tokens != UNBOUNDED else inst.num_blocks
        ctx = min(r.max_model_len if r.max_model_len != UNBOUNDED else model.max_context, blocks * block)
        mem = (model.weight_bytes + blocks * block * model.kv_bytes_per_token) / GIB * 1.001 + 1e-3
        raw["gpu"][f"r{i}"] = {"memory_gib": mem, "tflops": gpu.flops / 1e12, "bandwidth_gb_s": gpu.bandwidth / 1e9}
        raw["node"].append({"name": f"replica{i}", "gpus": [f"r{i}"]})
        raw["instance"].append({"name": f"replica{i}", "gpus": [f"replica{i}:0"], "num_kv_blocks": blocks, "max_model_len": ctx})
    raw["network"] = {**LOOPBACK, "entry": "replica0"}
    if slo is not None:
        raw["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}
    if workload is not None:
        raw["workload"] = workload
    spec = spec_from_dict(raw, base.path)
    # the fitted rates and overheads are the calibrated instance's: keep them, scaled per replica
    for x, k in zip(spec.instances, speed_factors(replicas, cores, calibrated_threads), strict=True):
        x.cost = inst.cost.scaled(1.0 / k)
    return spec
