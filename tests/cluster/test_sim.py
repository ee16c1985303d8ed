"""The simulator's invariants: requests conserved, KV memory never over capacity, determinism,
fast-forward equal to step-by-step, and single requests timed by hand from the cost model."""

from __future__ import annotations

import copy

import pytest

from mlsyskit.cluster.metrics import SUMMARY_KEYS, headline, summarize
from mlsyskit.cluster.policies import make_policy
from mlsyskit.cluster.report import build_policy
from mlsyskit.cluster.sim import TOKEN_ID_BYTES, prefill_time, simulate
from mlsyskit.cluster.workload import Workload, build_workload

ALL = ("random", "round-robin", "jsq", "lot", "length-class", "best-fit", "oracle", "predict", "predict-norecover")


def with_admission(spec, admission: str):
    spec = copy.copy(spec)
    spec.instances = [copy.copy(i) for i in spec.instances]
    for i in spec.instances:
        i.engine = copy.copy(i.engine)
        i.engine.admission = admission
    return spec


@pytest.mark.parametrize("admission", ["whole", "chunk"])
@pytest.mark.parametrize("lengths", ["known", "unknown"])
def test_every_request_is_accounted_for_and_memory_stays_in_the_pool(small_spec, admission, lengths) -> None:
    spec = with_admission(small_spec, admission)
    wl = build_workload({**spec.workload, "lengths": lengths}, rate=3.0, requests=200)
    pressure = 0
    for name in ALL:
        r = simulate(spec, wl, build_policy(name, spec, 0))
        assert len(r.status) == len(wl) == 200
        assert set(r.status) <= {"done", "truncated", "rejected"}
        s = summarize(r, spec.slo)
        assert s["completed"] + s["truncated"] + s["rejected"] == 200
        for i, st in enumerate(r.status):
            if st == "done":
                assert r.generated[i] == r.output[i]
                assert r.arrival[i] < r.t_first[i] <= r.t_finish[i]
            elif st == "truncated":  # only when the context of its instance ran out
                assert lengths == "unknown" and r.generated[i] < r.output[i]
        for inst in r.instances:
            assert 0 < inst["max_kv_blocks_used"] <= inst["kv_blocks"]
        for tl in r.timelines.values():
            assert all(0.0 <= kv <= 1.0 and 0.0 <= busy <= 1.0 for _, kv, busy, _ in tl)
        pressure += s["preemptions"]
    assert pressure > 0  # the scenario does push the KV pools to preemption


def test_deterministic_for_a_seed(small_spec) -> None:
    wl = build_workload(small_spec.workload)
    a = simulate(small_spec, wl, make_policy("random", 5))
    b = simulate(small_spec, wl, make_policy("random", 5))
    assert (a.t_first, a.t_finish, a.instance, a.preemptions) == (b.t_first, b.t_finish, b.instance, b.preemptions)
    c = simulate(small_spec, wl, make_policy("random", 6))
    assert c.instance != a.instance
    wl2 = build_workload(small_spec.workload, seed=4)
    assert simulate(small_spec, wl2, make_policy("random", 5)).t_finish != a.t_finish


@pytest.mark.parametrize(("policy", "lengths", "admission"),
                         [("round-robin", "known", "chunk"), ("predict", "unknown", "whole"), ("lot", "unknown", "whole")])
def test_fast_forward_equals_step_by_step(small_spec, policy, lengths, admission) -> None:
    """Runs of decode steps jumped over in closed form give the same times as one event per step."""
    spec = with_admission(small_spec, admission)
    wl = build_workload({**spec.workload, "lengths": lengths}, rate=3.0, requests=120)
    a = simulate(spec, wl, build_policy(policy, spec, 0))
    b = simulate(spec, wl, build_policy(policy, spec, 0), fast_forward=False)
    assert a.status == b.status and a.generated == b.generated and a.preemptions == b.preemptions
    assert a.migrations == b.migrations and a.instance == b.instance
    assert a.t_first == pytest.approx(b.t_first, abs=1e-9)
    assert a.t_finish == pytest.approx(b.t_finish, abs=1e-9)
    assert sum(b.migrations) > 0 if policy == "predict" else True
    assert sum(a.preemptions) > 0 if admission == "chunk" else True


def test_a_single_request_timed_by_hand(small_spec) -> None:
    """One request alone on the entry node's instance: first token after its prefill chunks, then
    one decode step per token, each from the cost model; the answer crosses no network."""
    spec = copy.copy(small_spec)
    spec.instances = spec.instances[:1]  # instance "a" on the entry node
    inst = spec.instances[0]
    c, budget = inst.cost, inst.engine.max_num_batched_tokens
    p, o = 3000, 5
    r = simulate(spec, Workload([1.0], [p], [o], ["x"]), make_policy("lot"))
    ttft = prefill_time(c, p, budget)  # chunks of 2048 then 952, the last one sampling
    first = c.step_time(2048, 0, c.prefill_pairs(0, 2048), 0, 1) + c.step_time(952, 1, c.prefill_pairs(2048, 952), 2048, 1)
    assert ttft == pytest.approx(first)
    decode = sum(c.step_time(1, 1, p + i + 1, p + i, 1) for i in range(o - 1))
    assert r.t_first[0] - 1.0 == pytest.approx(ttft, rel=1e-12)
    assert r.t_finish[0] - 1.0 == pytest.approx(ttft + decode, rel=1e-12)
    assert r.status == ["done"] and r.generated == [o]


def test_network_and_tensor_parallel_instance(small_spec) -> None:
    """The same request on the TP pair across the network: request ids out and the answer back
    cost latency + bytes / bandwidth; the pair decodes faster than a small GPU."""
    spec = copy.copy(small_spec)
    spec.instances = [small_spec.instances[2]]  # "big", on another node than the entry
    big = spec.instances[0]
    net = spec.network
    r = simulate(spec, Workload([0.0], [100], [50], ["x"]), make_policy("lot"))
    out = net.latency + 100 * TOKEN_ID_BYTES / net.bandwidth
    ttft = prefill_time(big.cost, 100, big.engine.max_num_batched_tokens)
    assert r.t_first[0] == pytest.approx(out + ttft + net.latency, rel=1e-12)
    small = small_spec.instances[0].cost
    assert big.cost.decode_run_time(1, 1000, 1) < 0.6 * small.decode_run_time(1, 1000, 1)


def test_preemption_when_the_pool_is_full_and_chunk_thrash(small_spec) -> None:
    """Two long requests on one 8 GiB instance do not fit together: the newer one is preempted
    (recomputed later) and both finish. With chunk admission it is re-admitted as soon as its
    first chunk fits and preempted again: many more preemptions, a much later finish."""
    ends = {}
    for admission in ("whole", "chunk"):
        spec = with_admission(small_spec, admission)
        spec.instances = spec.instances[:1]
        cap = spec.instances[0].kv_tokens
        p = cap // 2 - 200
        wl = Workload([0.0, 0.5], [p, p], [900, 900], ["l", "l"])
        r = simulate(spec, wl, make_policy("lot"))
        assert r.status == ["done", "done"] and r.generated == [900, 900]
        assert r.instances[0]["max_kv_blocks_used"] <= r.instances[0]["kv_blocks"]
        ends[admission] = (max(r.t_finish), sum(r.preemptions))
    assert ends["whole"][1] >= 1
    assert ends["chunk"][1] > 10 * ends["whole"][1] and ends["chunk"][0] > ends["whole"][0]


def test_rejected_and_truncated(small_spec) -> None:
    spec = small_spec
    cap = spec.instances[0].max_model_len
    wl = Workload([0.0, 0.1, 0.2], [40_000, 200, 200], [10, 50, cap], ["a", "b", "c"], lengths_known=False)
    r = simulate(spec, wl, make_policy("round-robin"))
    # 40k tokens fit no context: rejected by the router; the long output on a small instance
    # (round-robin's 2nd pick) runs until its context is full
    assert r.status[0] == "rejected" and r.t_first[0] == -1.0 and r.generated[0] == 0
    assert r.status[1] == "done"
    assert r.status[2] == "truncated" and r.generated[2] == cap - 200


def test_summary_keys(small_spec) -> None:
    wl = build_workload(small_spec.workload, requests=100)
    s = summarize(simulate(small_spec, wl, make_policy("lot")), small_spec.slo)
    h = headline(s)
    assert list(h) == list(SUMMARY_KEYS)
    assert 0.0 <= h["slo_attainment"] <= 1.0 and h["requests"] == 100
    assert h["ttft_p50"] <= h["ttft_p99"] and h["goodput_req_s"] <= s["requests"] / s["span_s"] + 1e-9
    assert set(s["by_class"]) == {"short", "long-generation", "long-context"}
