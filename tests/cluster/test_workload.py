"""Workloads: arrival processes, length distributions and presets, trace replay, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlsyskit.cluster.workload import PRESETS, build_workload, load_trace
from mlsyskit.errors import UserError


def test_poisson_and_gamma_arrivals() -> None:
    p = build_workload({"arrival": "poisson", "rate": 4.0, "requests": 20000, "seed": 1})
    gaps = np.diff(p.arrival)
    assert p.arrival[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: cv 1
    g = build_workload({"arrival": "gamma", "cv": 3.0, "rate": 4.0, "requests": 20000, "seed": 1})
    gg = np.diff(g.arrival)
    assert gg.mean() == pytest.approx(0.25, rel=0.1)
    assert gg.std() / gg.mean() == pytest.approx(3.0, rel=0.15)  # bursty


def test_presets_follow_the_vllm_paper_means() -> None:
    for name, (pin, pout) in {"sharegpt": (161.31, 337.99), "alpaca": (19.31, 58.45)}.items():
        wl = build_workload({"preset": name, "requests": 40000, "seed": 0})
        # the paper's means, up to the clipping to [min, max] of our lognormal shape
        assert np.mean(wl.prompt) == pytest.approx(pin, rel=0.08)
        assert np.mean(wl.output) == pytest.approx(pout, rel=0.08)
        assert min(wl.prompt) >= PRESETS[name]["prompt"]["min"] and max(wl.output) <= PRESETS[name]["output"]["max"]


def test_classes_and_determinism() -> None:
    table = {"requests": 5000, "rate": 2.0, "seed": 7, "class": [
        {"name": "short", "weight": 3, "prompt": {"dist": "uniform", "min": 10, "max": 20}, "output": 5},
        {"name": "long", "weight": 1, "prompt": {"dist": "fixed", "value": 1000}, "output": {"dist": "uniform", "min": 100, "max": 200}},
    ]}
    a, b = build_workload(table), build_workload(table)
    assert a.arrival == b.arrival and a.prompt == b.prompt and a.output == b.output
    c = build_workload(table, seed=8)
    assert c.prompt != a.prompt
    short = [i for i, k in enumerate(a.klass) if k == "short"]
    assert len(short) / len(a) == pytest.approx(0.75, abs=0.03)
    assert all(10 <= a.prompt[i] <= 20 and a.output[i] == 5 for i in short)
    assert all(a.prompt[i] == 1000 and 100 <= a.output[i] <= 200 for i in range(len(a)) if a.klass[i] == "long")
    assert a.lengths_known and not build_workload({**table, "lengths": "unknown"}).lengths_known


def test_trace_replay_in_loadgen_record_format(tmp_path) -> None:
    # what `mlsyskit loadgen` records per request (run_load(keep_records=True))
    recs = [
        {"status": 200, "ttft": 0.1, "latency": 1.0, "tokens": 32, "text": "...", "error": None, "arrival": 0.5, "prompt": "x" * 40},
        {"status": 200, "ttft": 0.2, "latency": 2.0, "tokens": 10, "text": "...", "error": None, "arrival": 1.5, "prompt": "y" * 8},
        {"status": 429, "ttft": None, "latency": 0.01, "tokens": 0, "text": "", "error": None, "arrival": 2.0, "prompt": "z"},
        {"status": 200, "ttft": None, "latency": 5.0, "tokens": 3, "text": "", "error": "timeout", "arrival": 2.5, "prompt": "w"},
        {"arrival": 3.5, "prompt_tokens": 100, "output_tokens": 7},
    ]
    jl = tmp_path / "trace.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    wl = load_trace(jl)
    assert wl.arrival == [0.0, 1.0, 3.0]  # failed requests skipped, clock from the first arrival
    assert wl.prompt == [11, 3, 100]  # 4 characters a token, as the router estimates
    assert wl.output == [32, 10, 7]
    assert wl.source["skipped"] == 2 and wl.rate == pytest.approx(2 / 3)
    # the JSON report with a records list reads the same
    js = tmp_path / "load.json"
    js.write_text(json.dumps({"offered_rate": 1.0, "records": recs}, indent=2))
    assert load_trace(js).prompt == wl.prompt
    # through [workload]: --rate rescales the trace's clock
    w2 = build_workload({"arrival": "trace", "trace": "trace.jsonl"}, rate=4 / 3, base_dir=tmp_path)
    assert w2.arrival == pytest.approx([0.0, 0.5, 1.5])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"arrival": "uniform"}, "arrival must be"),
        ({"rate": 0}, "rate must be positive"),
        ({"lengths": "maybe"}, "known or unknown"),
        ({"preset": "nope"}, "unknown preset"),
        ({"prompt": {"dist": "zipf"}}, "unknown dist"),
        ({"prompt": {"dist": "uniform", "min": 5, "max": 2}}, "min <= max"),
        ({"class": [{"name": "a", "weight": -1, "prompt": 1, "output": 1}]}, "weights"),
        ({"arrival": "trace"}, "needs trace"),
        ({"rates": 1}, "unknown key"),
    ],
)
def test_bad_workloads(table: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_workload(table)


def test_bad_traces(tmp_path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"arrival": 0, "prompt": "hi", "tokens": 3}\nnot json\n')
    with pytest.raises(UserError, match="t.jsonl:2"):
        load_trace(p)
    p.write_text('{"prompt": "hi", "tokens": 3}\n')
    with pytest.raises(UserError, match="arrival"):
        load_trace(p)
    p.write_text('{"arrival": 0, "status": 500, "prompt": "hi", "tokens": 0}\n')
    with pytest.raises(UserError, match="no usable request"):
        load_trace(p)
