"""`mlsyskit serve` as a user runs it: help, one-line errors with exit 2, the RAG wiring, the API
key from the environment, and graceful shutdown on SIGTERM with requests in flight."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from mlsyskit.cli import main


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``mlsyskit serve ARGS`` through the CLI's own entry point (in-process: no second torch
    import); returns the exit code, stdout and stderr."""
    try:
        code = main(["serve", *args])
    except SystemExit as e:  # argparse's own errors and --help
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_states_defaults(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    for part in ("default: 127.0.0.1", "default: 8000", "default: continuous", "--max-batch-size", "default: 256", "--replicas", "--autoscale", "MLSYSKIT_API_KEY", "--docs"):
        assert part in text, part


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batching", "sometimes"], "invalid choice: 'sometimes'"),
        (["--max-queue", "-1"], "--max-queue must be >= 0"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--model", "/nonexistent/model.gguf", "--port", "0", "--no-rag"], "does not exist"),
        (["--no-rag", "--docs", "notes/", "--port", "0"], "--no-rag serves no RAG routes, so --docs notes/ would never be read"),
        (["--replicas", "2", "--docs", "notes/", "--no-rag", "--port", "0"], "--no-rag serves no RAG routes"),
        (["--replicas", "2", "--max-queue", "-1"], "--max-queue must be >= 0"),
    ],
)
def test_bad_flags_one_line_exit_2(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_port_in_use(capsys, smollm2_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        code, _, err = run_cli(capsys, "--model", str(smollm2_path), "--port", str(port), "--no-rag")
    assert code == 2
    assert err.strip() == f"mlsyskit serve: error: port {port} on 127.0.0.1 is already in use; pick another with --port (0 = any free port)"
    assert time.perf_counter() - t0 < 5  # refused before the model loads


def _stream(url: str, body: dict, headers: dict, result: dict, started: threading.Event) -> None:
    """Read one SSE response to the end, recording its events (run in a thread)."""
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as e:  # a cut connection is a failure of the test
        result["error"] = repr(e)
    finally:
        started.set()
        result["events"] = events


def test_rag_key_from_env_and_graceful_sigterm(launch_server, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "harbor.txt").write_text("The lighthouse of Port Vell was painted green in 1931.", encoding="utf-8")
    (docs / "bread.txt").write_text("Sourdough bread rises thanks to wild yeast and lactic bacteria.", encoding="utf-8")
    (docs / "latin1.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))  # skipped with a warning, not fatal
    url = launch_server(tmp_path / "server.log", env={"MLSYSKIT_API_KEY": "envkey"}, docs=docs, drain_timeout=3)
    headers = {"Authorization": "Bearer envkey"}
    try:
        assert "ready in" in url.log_text() and "model loaded in" in url.log_text()
        assert f"warning: --docs {docs}: skipping latin1.txt: not UTF-8 text" in url.log_text()
        assert f"--docs {docs}: indexed 2 files, skipped 1 (1 not UTF-8)" in url.log_text()
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # the key came from the env
        r = httpx.post(f"{url}/v1/rag", json={"query": "What color is the lighthouse of Port Vell?", "k": 1, "max_tokens": 4}, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["documents"][0]["id"] == "harbor.txt"

        # Two streams in flight at SIGTERM: a short one finishes, a long one is cut at the drain
        # deadline (3 s) and still ends cleanly with an error event and [DONE].
        short = {"model": url.model, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stream": True}
        long = {"model": url.model, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 480, "temperature": 0, "stream": True}
        results = [{}, {}]
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=_stream, args=(url, b, headers, res, ev)) for b, res, ev in zip((short, long), results, started, strict=True)]
        for t in threads:
            t.start()
        assert all(ev.wait(60) for ev in started)
        t0 = time.perf_counter()
        url.proc.send_signal(signal.SIGTERM)
        code = url.proc.wait(60)
        elapsed = time.perf_counter() - t0
        for t in threads:
            t.join(30)
    finally:
        if url.proc.poll() is None:
            url.proc.kill()
    log = url.log_text()
    assert code == 0, log
    assert elapsed < 20, elapsed
    assert "Traceback" not in log and "server stopped" in log
    for res in results:
        assert res.get("status") == 200 and "error" not in res, res
        assert res["events"][-1] == "[DONE]"
    short_events = [json.loads(e) for e in results[0]["events"][:-1]]
    assert short_events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    long_events = [json.loads(e) for e in results[1]["events"][:-1]]
    assert long_events[-1]["error"]["code"] == "aborted"
    assert len(long_events) > 2  # it streamed text before it was cut
    with pytest.raises(httpx.ConnectError):  # nothing listens any more
        httpx.get(f"{url}/health", timeout=5)


def test_sigterm_drain_is_visible_then_streams_end_cleanly(launch_server, tmp_path):
    """While it drains, the server still listens: /health and new requests get a real 503; at
    the --drain-timeout deadline the open stream ends with an error event and [DONE]; exit 0."""
    url = launch_server(tmp_path / "server.log", drain_timeout=2)
    long = {"model": url.model, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 480, "temperature": 0, "stream": True}
    result: dict = {}
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(url, long, {}, result, started))
    try:
        t.start()
        assert started.wait(60)
        t0 = time.perf_counter()
        url.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        new = httpx.post(f"{url}/v1/completions", json={**long, "stream": False, "max_tokens": 2}, timeout=5)
        assert new.status_code == 503 and new.json()["error"]["code"] == "unavailable", new.text
        assert int(new.headers["Retry-After"]) >= 1
        code = url.proc.wait(30)
        elapsed = time.perf_counter() - t0
        t.join(30)
    finally:
        if url.proc.poll() is None:
            url.proc.kill()
    log = url.log_text()
    print(f"serve --drain-timeout 2: SIGTERM to exit {elapsed:.1f}s")
    assert code == 0 and "Traceback" not in log and "server stopped" in log, log
    assert elapsed < 2 + 8, elapsed  # the drain deadline plus the shutdown itself
    assert result.get("status") == 200 and "error" not in result, result
    assert result["events"][-1] == "[DONE]"
    assert json.loads(result["events"][-2])["error"]["code"] == "aborted"
    with pytest.raises(httpx.ConnectError):  # closed once drained
        httpx.get(f"{url}/health", timeout=5)


def test_replicas_sigterm_during_a_stream_drains_and_exits_0(launch_server, tmp_path):
    """`serve --replicas 2`: SIGTERM mid-stream. The router keeps listening while it drains (503s),
    the workers drain on their own --drain-timeout, the stream ends with an error event and
    [DONE] (not a cut connection), and everything exits 0 within seconds, no traceback, no SIGKILL."""
    url = launch_server(tmp_path / "replicas.log", replicas=2, drain_timeout=2)
    long = {"model": url.model, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 480, "temperature": 0, "stream": True}
    result: dict = {}
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(url, long, {}, result, started))
    try:
        t.start()
        assert started.wait(60)
        t0 = time.perf_counter()
        url.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        new = httpx.post(f"{url}/v1/completions", json={**long, "stream": False, "max_tokens": 2}, timeout=5)
        assert new.status_code == 503 and new.json()["error"]["code"] == "shutting_down", new.text
        code = url.proc.wait(60)
        elapsed = time.perf_counter() - t0
        t.join(30)
    finally:
        if url.proc.poll() is None:
            url.proc.kill()
    log = url.log_text()
    print(f"serve --replicas 2 --drain-timeout 2: SIGTERM to exit {elapsed:.1f}s")
    assert code == 0, log
    assert elapsed < 2 + 10, (elapsed, log)
    for bad in ("Traceback", "CancelledError", "SIGKILL", "graceful shutdown exceeded"):
        assert bad not in log, log
    assert result.get("status") == 200 and "error" not in result, result  # never a cut connection
    assert result["events"][-1] == "[DONE]"
    assert json.loads(result["events"][-2])["error"]["code"] == "aborted"
    ports = re.findall(r"replica \d+ ready on http://127.0.0.1:(\d+)", log)
    assert len(ports) == 2 and "server stopped" in log
    for p in (*ports, url.rsplit(":", 1)[1]):  # no worker outlives the server
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/health", timeout=5)
