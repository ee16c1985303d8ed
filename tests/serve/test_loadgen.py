"""The load generator against a real `mlsyskit serve` (tiny random Llama) that runs one request at
a time and queues at most one (`--max-num-seqs 1 --max-queue 1`): light load gets every answer,
a burst gets 429s."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from mlsyskit.errors import UserError
from mlsyskit.serve.loadgen import arrival_times, check_loopback, load_prompts, run_load

READY = re.compile(r"^serving (\S+) on (http://\S+) ", re.M)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("loadgen") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLSYSKIT_API_KEY", None)
    cmd = [sys.executable, "-m", "mlsyskit", "serve", "--model", str(tiny_llama_dir), "--port", "0", "--threads", "1",
           "--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "1", "--max-queue", "1"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while not (m := READY.search(log.read_text(errors="replace"))):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)
    yield m.group(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def test_light_load_all_answered_counts_add_up(server) -> None:
    r = run_load(server, rate=4, duration=2, arrival="constant", max_tokens=8, stream=True, keep_records=True)
    assert r["scheduled"] == 8 and r["sent"] == 8  # constant: 1/rate gaps in [0, duration)
    assert r["ok"] + r["failed"] == r["sent"]
    assert r["ok"] >= 6, r  # one at a time, but short requests: at most a rare 429
    assert r["ok"] + r["rate_limited_429"] == r["sent"] and r["timeouts"] == 0
    assert 0 < r["latency_p50_s"] <= r["latency_p90_s"] <= r["latency_p99_s"]
    assert 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]
    ok = [x for x in r["records"] if x["status"] == 200]
    assert all(x["ttft"] <= x["latency"] for x in ok)
    assert all(1 <= x["tokens"] <= 8 and x["text"] for x in ok)  # usage from the last SSE chunk
    assert r["output_tokens"] == sum(x["tokens"] for x in ok)
    assert r["throughput_req_s"] == pytest.approx(r["ok"] / r["wall_s"], rel=1e-3)


def test_burst_gets_429s_counted_by_status(server) -> None:
    r = run_load(server, rate=40, duration=1, arrival="constant", max_tokens=48, stream=False, endpoint="completions")
    assert r["sent"] == 40
    assert r["rate_limited_429"] > 0 and r["errors_by_status"]["429"] == r["rate_limited_429"]
    assert r["ok"] >= 2  # the one running and the one queued
    assert r["ok"] + sum(r["errors_by_status"].values()) + r["timeouts"] + sum(r["errors_other"].values()) == r["sent"]
    assert r["ttft_p50_s"] is None  # not streamed: no TTFT
    assert r["error_rate"] == pytest.approx(r["failed"] / r["sent"])


def test_timeouts_are_counted_not_raised(server) -> None:
    r = run_load(server, rate=2, duration=1, arrival="constant", max_tokens=200, stream=True, timeout=0.05)
    assert r["sent"] == 2 and r["timeouts"] + r["rate_limited_429"] == 2 and r["ok"] == 0


def test_cli_writes_report_and_refuses_other_hosts(server, tmp_path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n\n{"prompt": "Name a color."}\n')
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "mlsyskit", "loadgen", "--url", server, "--rate", "3", "--duration", "1",
           "--arrival", "constant", "--prompts", str(prompts), "--max-tokens", "4", "--out", str(out),
           "--max-error-rate", "1"]  # a rare 429 from this one-at-a-time server is not this test's subject
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "latency p50/p90/p99" in done.stdout
    report = json.loads(out.read_text())
    assert report["sent"] == 3 and report["endpoint"] == "chat"

    bad = subprocess.run([sys.executable, "-m", "mlsyskit", "loadgen", "--url", "http://192.0.2.1:8000", "--rate", "1", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "loopback" in bad.stderr


def test_input_checks(tmp_path) -> None:
    assert check_loopback("http://localhost:1/") == "http://localhost:1"
    assert check_loopback("http://[::1]:8000") == "http://[::1]:8000"
    for url in ("http://example.com", "http://10.0.0.1:80", "ftp://127.0.0.1", "127.0.0.1:8000"):
        with pytest.raises(UserError):
            check_loopback(url)
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n  \nsecond prompt\n")
    assert load_prompts(f) == ["first prompt", "second prompt"]
    f.write_text('{"prompt": 3}\n')
    with pytest.raises(UserError, match="prompt"):
        load_prompts(f)
    f.write_text("\n\n")
    with pytest.raises(UserError, match="no prompt"):
        load_prompts(f)
    with pytest.raises(UserError):
        run_load("http://127.0.0.1:1", rate=0, duration=1)
    t = arrival_times(50, 4, "poisson", seed=3)
    assert (t >= 0).all() and (t < 4).all() and (t[1:] >= t[:-1]).all()
    assert 120 < len(t) < 280  # ~200 expected
    assert (arrival_times(50, 4, "poisson", seed=3) == t).all()


def test_cli_exit_status_follows_the_error_rate(tmp_path) -> None:
    """Nothing listening: every request fails, the report still prints, and the exit status says so
    (1 above --max-error-rate, default 10 %), so a script or CI job can rely on it."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "mlsyskit", "loadgen", "--url", f"http://127.0.0.1:{port}", "--rate", "5", "--duration", "1",
            "--arrival", "constant", "--timeout", "5"]
    failed = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert '"connection": 5' in failed.stdout  # the report is printed first
    assert failed.stderr.strip() == "mlsyskit loadgen: error rate 100.0% (5 of 5 arrivals not answered) is above --max-error-rate 10.0%"
    tolerated = subprocess.run([*base, "--max-error-rate", "1"], capture_output=True, text=True, timeout=120)
    assert tolerated.returncode == 0 and not tolerated.stderr, tolerated.stderr
    bad = subprocess.run([*base, "--max-error-rate", "10"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "mlsyskit loadgen: error: --max-error-rate is a fraction in 0..1 (0.1 = 10%), got 10.0"
