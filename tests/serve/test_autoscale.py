"""Autoscaler decisions (hysteresis, cooldown, bounds), then one real `serve --autoscale 1..2` run:
a queue builds up, a second replica is started and joins the rotation, the load ends, one replica
is drained and stopped, and SIGTERM stops everything with exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mlsyskit.errors import UserError
from mlsyskit.serve.autoscale import Autoscaler, Observation, parse_range
from mlsyskit.serve.replicas import autoscale_settings


def obs(t: float, replicas: int, queue: float, p90: float | None = None) -> Observation:
    return Observation(t=t, replicas=replicas, queue_depth=queue, p90_latency_s=p90)


def test_scale_up_needs_consecutive_hot_observations() -> None:
    a = Autoscaler(1, 3, up_threshold=2, down_threshold=0, up_after=3, down_after=2, cooldown=0)
    assert [a.decide(obs(t, 1, 5)) for t in range(2)] == [0, 0]
    assert a.decide(obs(2, 1, 1)) == 0  # a cool poll resets the streak
    assert [a.decide(obs(t, 1, 5)) for t in range(3, 5)] == [0, 0]
    assert a.decide(obs(5, 1, 5)) == +1
    # queue per replica, not total: 5 waiting over 3 replicas is 1.67 < 2
    b = Autoscaler(1, 4, up_threshold=2, down_threshold=0, up_after=1, down_after=1, cooldown=0)
    assert b.decide(obs(0, 3, 5)) == 0
    assert b.decide(obs(1, 3, 6)) == +1


def test_hysteresis_band_holds_steady() -> None:
    a = Autoscaler(1, 3, up_threshold=4, down_threshold=1, up_after=1, down_after=1, cooldown=0)
    # between the thresholds nothing happens, however long it lasts
    assert all(a.decide(obs(t, 2, 2 * 2.5)) == 0 for t in range(20))
    assert a.decide(obs(20, 2, 2 * 1)) == -1  # at or below down_threshold
    assert a.decide(obs(21, 2, 2 * 4)) == +1


def test_cooldown_after_a_change() -> None:
    a = Autoscaler(1, 4, up_threshold=1, down_threshold=0, up_after=1, down_after=1, cooldown=10)
    assert a.decide(obs(0, 1, 3)) == +1
    assert a.decide(obs(5, 2, 6)) == 0  # still hot, but cooling down
    assert a.decide(obs(9.9, 2, 6)) == 0
    assert a.decide(obs(10, 2, 6)) == +1
    assert a.decide(obs(12, 3, 0)) == 0
    a.cancel()  # that change failed (replica did not start): no cooldown for the retry
    assert a.decide(obs(13, 3, 9)) == +1


def test_bounds() -> None:
    a = Autoscaler(2, 3, up_threshold=1, down_threshold=0, up_after=1, down_after=1, cooldown=100)
    assert a.decide(obs(0, 3, 50)) == 0  # at max: never up
    assert a.decide(obs(1, 2, 0)) == 0  # at min: never down
    assert a.decide(obs(2, 1, 0)) == +1  # below min (a replica died): up at once, cooldown or not
    assert a.decide(obs(3, 4, 0)) == -1  # above max: down at once


def test_latency_signal() -> None:
    a = Autoscaler(1, 2, up_threshold=10, down_threshold=0, up_after=2, down_after=2, cooldown=0, latency_up_s=5.0, latency_down_s=1.0)
    assert a.decide(obs(0, 1, 0, p90=8.0)) == 0
    assert a.decide(obs(1, 1, 0, p90=8.0)) == +1  # slow answers with an empty queue
    # an empty queue is not enough to scale down while latency is above latency_down_s
    assert [a.decide(obs(t, 2, 0, p90=3.0)) for t in range(2, 6)] == [0, 0, 0, 0]
    assert [a.decide(obs(t, 2, 0, p90=0.5)) for t in range(6, 8)] == [0, -1]


def test_bad_settings_are_one_line_errors() -> None:
    assert parse_range("1..4") == (1, 4)
    assert parse_range("3") == (3, 3)
    for bad in ("0..2", "3..2", "a..b", "1-4"):
        with pytest.raises(UserError, match="autoscale"):
            parse_range(bad)
    with pytest.raises(UserError):
        Autoscaler(1, 2, up_threshold=1, down_threshold=1)
    assert autoscale_settings("up_threshold=3, cooldown=0.5,interval=0.2") == {"up_threshold": 3.0, "cooldown": 0.5, "interval": 0.2}
    for bad in ("bogus=1", "cooldown", "up_after=x", "interval=0"):
        with pytest.raises(UserError, match="MLSYSKIT_AUTOSCALE"):
            autoscale_settings(bad)


READY = re.compile(r"^serving (\S+) on (http://\S+) ", re.M)


def _start(cmd: list[str], log, extra_env: dict | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start a `mlsyskit serve` command line; (process, model name, URL) once it prints its ready line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    env.pop("MLSYSKIT_API_KEY", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while not (m := READY.search(log.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(log.read_text(errors="replace"))
        time.sleep(0.05)
    return proc, m.group(1), m.group(2)


def test_serve_autoscale_scales_up_then_drains_down(tiny_llama_dir, tmp_path) -> None:
    log = tmp_path / "autoscale.log"
    # one sequence at a time per replica, so concurrent requests queue up
    cmd = [sys.executable, "-m", "mlsyskit", "serve", "--model", str(tiny_llama_dir), "--port", "0", "--threads", "2",
           "--autoscale", "1..2", "--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "1"]
    proc, model, url = _start(cmd, log, {"MLSYSKIT_AUTOSCALE": "up_threshold=2,up_after=2,down_after=3,cooldown=1,interval=0.25"})
    try:

        def live() -> list[str]:
            return [b["url"] for b in httpx.get(url + "/health", timeout=5).json()["backends"] if b["alive"] and not b["draining"]]

        assert len(live()) == 1
        first = live()[0]
        results: list[int] = []
        seen_two = threading.Event()

        def client(i: int) -> None:
            # keep a queue on the replicas until a second one has joined, then a little longer
            with httpx.Client(timeout=120) as c:
                for j in range(400):
                    body = {"model": model, "prompt": f"request {i}-{j}", "max_tokens": 32, "temperature": 0}
                    results.append(c.post(url + "/v1/completions", json=body).status_code)
                    if seen_two.is_set() and j >= 2:
                        return

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while len(live()) < 2:
            assert time.monotonic() - t0 < 90, log.read_text(errors="replace")
            time.sleep(0.1)
        seen_two.set()
        for t in threads:
            t.join()
        assert results and all(s == 200 for s in results)  # no request lost while scaling
        text = log.read_text(errors="replace")
        assert "autoscale: 1 -> 2 replicas" in text and "cold start" in text

        # load gone: after down_after quiet polls one replica is drained and stopped
        t0 = time.monotonic()
        while len(live()) > 1:
            assert time.monotonic() - t0 < 60, log.read_text(errors="replace")
            time.sleep(0.1)
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert 'mlsyskit_replica_events_total{event="up"} 1' in metrics
        t0 = time.monotonic()
        while 'mlsyskit_replica_events_total{event="down"} 1' not in httpx.get(url + "/metrics", timeout=5).text:
            assert time.monotonic() - t0 < 30
            time.sleep(0.1)
        assert "drained and stopped" in log.read_text(errors="replace")
        # still serving on the one left
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "still there?", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        assert first in live() or len(live()) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text(errors="replace")
    # no worker outlives the server
    ports = re.findall(r"replica \d+ ready on http://127.0.0.1:(\d+)", log.read_text())
    assert len(ports) == 2
    for p in ports:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{p}/health", timeout=2)


def test_worker_flags_forward_the_model_flags_only() -> None:
    from mlsyskit.cli import build_parser
    from mlsyskit.serve.replicas import worker_flags

    args = build_parser().parse_args(["serve", "--replicas", "2", "--batching", "window", "--max-batch-size", "4", "--no-rag",
                                      "--api-key", "secret", "--threads", "2", "--port", "9", "--max-model-len", "512"])
    flags = worker_flags(args)
    assert len(flags) == 7 and "--no-rag" in flags
    for opt, val in (("--max-model-len", "512"), ("--batching", "window"), ("--max-batch-size", "4")):
        assert flags[flags.index(opt) + 1] == val
    assert "secret" not in flags and "--replicas" not in flags and "--port" not in flags and "--threads" not in flags
    # a worker given these flags parses them back to the same settings
    again = build_parser().parse_args(["serve", *flags])
    for key, value in vars(args).items():
        if key not in ("replicas", "api_key", "threads", "port", "func"):
            assert getattr(again, key) == value, key


def test_unequal_replicas_get_their_specs_and_the_policy_knows_them(tiny_llama_dir, tmp_path) -> None:
    """`serve --replicas 2 --replica-spec A B`: each worker runs with its own KV budget and
    context, and the length-class policy sends a request only the larger context holds there."""
    log = tmp_path / "unequal.log"
    cmd = [sys.executable, "-m", "mlsyskit", "serve", "--model", str(tiny_llama_dir), "--port", "0", "--no-rag",
           "--replicas", "2", "--policy", "length-class",
           "--replica-spec", "threads=1,kv=512,ctx=128", "threads=1,kv=2048,ctx=256"]
    proc, model, url = _start(cmd, log)
    try:
        assert "threads 1/1, router: policy length-class" in log.read_text()
        backends = [b["url"] for b in httpx.get(url + "/health", timeout=5).json()["backends"]]
        seen = {}
        for b in backends:
            ctx = httpx.get(b + "/v1/models", timeout=5).json()["data"][0]["max_model_len"]
            seen[ctx] = (b, httpx.get(b + "/health", timeout=5).json())
        assert sorted(seen) == [128, 256]  # each worker runs with its spec's context
        assert seen[128][1]["kv_blocks_total"] == 512 // 16 and seen[256][1]["kv_blocks_total"] == 2048 // 16
        # ~150 prompt tokens + 60: only the ctx=256 replica holds it; the router sends it there
        body = {"model": model, "prompt": "word " * 150, "max_tokens": 60, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        served = {b["url"]: b["requests"] for b in httpx.get(url + "/health", timeout=5).json()["backends"]}
        assert served[seen[256][0]] == 1 and served[seen[128][0]] == 0, served
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text(errors="replace")


def test_replica_specs_must_match_the_replicas(capsys) -> None:
    from mlsyskit.cli import main

    code = main(["serve", "--replicas", "2", "--replica-spec", "threads=1", "--port", "0", "--no-rag"])
    err = capsys.readouterr().err
    assert code != 0 and "--replica-spec: give one per replica" in err and "Traceback" not in err
