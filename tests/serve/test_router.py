"""The router in front of two real `mlsyskit serve` processes (tiny random Llama, greedy).

Runs in file order on one module-scoped cluster: balancing, streaming and passthrough first,
then a replica is SIGKILLed under load, restarted, and finally every backend is killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

READY = re.compile(r"^serving (\S+) on (http://\S+) ", re.M)
SERVE = ["--threads", "1", "--max-model-len", "256", "--num-kv-blocks", "128", "--log-level", "warning"]


class Server(str):
    """A backend's base URL with its process."""

    proc: subprocess.Popen
    model: str


def spawn_servers(model: Path, folder: Path, n: int, port: int = 0) -> list[tuple[subprocess.Popen, Path]]:
    """Start n `mlsyskit serve` processes at once (they load in parallel)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLSYSKIT_API_KEY", None)
    started = []
    for _ in range(n):
        log = folder / f"serve{len(list(folder.iterdir()))}.log"
        with open(log, "wb") as f:
            cmd = [sys.executable, "-m", "mlsyskit", "serve", "--model", str(model), "--port", str(port), *SERVE]
            started.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
    return started


def wait_ready(started: list[tuple[subprocess.Popen, Path]]) -> list[Server]:
    """Wait for each server's ready line."""
    out = []
    deadline = time.monotonic() + 180
    for proc, log in started:
        while not (m := READY.search(log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        s = Server(m.group(2))
        s.proc, s.model = proc, m.group(1)
        out.append(s)
    return out


def stop_all(servers: list[Server]) -> None:
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in servers:
        try:
            s.proc.wait(30)
        except subprocess.TimeoutExpired:
            s.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(backends: list[str], log: Path, wait: bool = True, extra: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen]:
    """`mlsyskit router` as a user runs it (plus `extra` flags); returns its URL once /health
    answers (any status unless `wait`: then 200, a live backend)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlsyskit", "router", "--backends", *backends, "--port", str(port), "--health-interval", "0.2", *extra]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200 or not wait:
                return url, proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("router did not come up:\n" + log.read_text())


def chat(model: str, prompt: str, max_tokens: int = 16, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def backend_state(router: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(router + "/health", timeout=5).json()["backends"]}


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    # ports chosen here, so the router can start while the servers load
    ports = [free_port(), free_port()]
    started = [spawn_servers(tiny_llama_dir, folder, 1, port=p)[0] for p in ports]
    router, proc = start_router([f"http://127.0.0.1:{p}" for p in ports], folder / "router.log", wait=False)
    a, b = servers = wait_ready(started)
    wait_for(lambda: all(x["alive"] for x in backend_state(router).values()), 30, "both backends in rotation")
    yield {"a": a, "b": b, "router": router, "proc": proc, "model": a.model, "servers": servers, "folder": folder}
    stop_all(servers)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # graceful stop exits 0


def test_least_outstanding_tokens_avoids_the_busy_backend(cluster) -> None:
    router, model = cluster["router"], cluster["model"]
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", router + "/v1/chat/completions", json=chat(model, "Tell me a long story.", max_tokens=200, stream=True)) as long:
            assert long.status_code == 200
            busy = long.headers["x-mlsyskit-backend"]
            lines = long.iter_lines()
            next(lines)  # the long request is running on `busy`
            assert backend_state(router)[busy]["outstanding_tokens"] >= 200

            # While it runs, short requests all go to the other backend (round-robin would
            # send every second one to the busy backend).
            def short(i: int) -> str:
                r = httpx.post(router + "/v1/chat/completions", json=chat(model, f"Hi {i}", max_tokens=4), timeout=60)
                assert r.status_code == 200, r.text
                return r.headers["x-mlsyskit-backend"]

            with ThreadPoolExecutor(3) as pool:
                used = list(pool.map(short, range(3)))
            assert busy not in used
            assert len(set(used)) == 1
            rest = [line for line in lines if line.startswith("data:")]
            assert rest[-1] == "data: [DONE]"
    # every request returned its tokens to the pool
    assert all(b["outstanding_tokens"] == 0 and b["in_flight"] == 0 for b in backend_state(router).values())


def sse_text(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith("data:") and line.strip() != "data: [DONE]":
            obj = json.loads(line[5:])
            if obj.get("choices"):
                out.append(obj["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def test_streaming_through_the_router_gives_the_same_text(cluster) -> None:
    router, model, a = cluster["router"], cluster["model"], cluster["a"]
    body = chat(model, "What is the capital of France?", max_tokens=24)
    direct = httpx.post(a + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
    assert direct
    with httpx.stream("POST", router + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    assert sse_text(lines) == direct
    # and the completions endpoint, not streamed
    comp = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    via = httpx.post(router + "/v1/completions", json=comp, timeout=60)
    assert via.status_code == 200
    assert via.json()["choices"][0]["text"] == httpx.post(a + "/v1/completions", json=comp, timeout=60).json()["choices"][0]["text"]


def test_predict_policy_learns_output_lengths_from_real_answers(cluster) -> None:
    """A second router, `--policy predict`, over the same replicas: every answer's output length
    (usage of a plain answer, content chunks of a stream) reaches the predictor."""
    model, (a, b) = cluster["model"], cluster["servers"]
    url, proc = start_router([a, b], cluster["folder"] / "router-predict.log", extra=("--policy", "predict"))
    try:
        assert backend_state(url)  # up
        assert httpx.get(url + "/health", timeout=5).json()["policy"] == {"name": "predict", "learned_from": 0, "predicted_output_tokens": 128}
        lengths = []
        for i in range(3):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": f"Story {i}:", "max_tokens": 5 + i, "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200
            lengths.append(r.json()["usage"]["completion_tokens"])
        for i in range(2):
            with httpx.stream("POST", url + "/v1/completions", json={"model": model, "prompt": f"Tale {i}:", "max_tokens": 9, "temperature": 0, "ignore_eos": True, "stream": True}, timeout=60) as r:
                assert r.status_code == 200
                list(r.iter_lines())
            lengths.append(9)
        assert lengths[:3] == [5, 6, 7]
        wait_for(lambda: httpx.get(url + "/health", timeout=5).json()["policy"]["learned_from"] == 5, 10, "five answers learned")
        # fewer than 8 outputs per prompt bucket: the pooled window's median, 7 of [5, 6, 7, 9, 9]
        assert httpx.get(url + "/health", timeout=5).json()["policy"]["predicted_output_tokens"] == 7
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_models_metrics_and_client_errors_pass_through(cluster) -> None:
    router, model = cluster["router"], cluster["model"]
    models = httpx.get(router + "/v1/models", timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == model
    # the replicas serve RAG too: both models, each retrievable by id through the router
    assert [m["type"] for m in models.json()["data"]] == ["chat", "embedding"]
    for m in models.json()["data"]:  # ("created" is each replica's start: either may answer)
        card = httpx.get(f"{router}/v1/models/{m['id']}", timeout=10).json()
        assert {**card, "created": 0} == {**m, "created": 0}
    # a client error is the backend's answer: passed through, not retried, nobody marked dead
    bad = httpx.post(router + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert bad.status_code == 400 and "message" in bad.json()["error"]
    neg = httpx.post(router + "/v1/chat/completions", json={**chat(model, "x"), "max_tokens": -1}, timeout=10)
    assert 400 <= neg.status_code < 500 and neg.json()["error"]["message"]
    assert all(b["alive"] for b in backend_state(router).values())
    text = httpx.get(router + "/metrics", timeout=10).text
    assert "mlsyskit_router_retries_total 0" in text
    assert f'mlsyskit_router_backend_alive{{backend="{cluster["a"]}"}} 1' in text
    assert "mlsyskit_router_backend_outstanding_tokens" in text


def test_client_dropping_a_stream_frees_the_replica(cluster) -> None:
    router, model = cluster["router"], cluster["model"]
    with httpx.stream("POST", router + "/v1/chat/completions", json=chat(model, "Tell me everything.", max_tokens=220, stream=True), timeout=60) as r:
        backend = r.headers["x-mlsyskit-backend"]
        for line in r.iter_lines():
            if line.startswith("data: {") and "content" in line:
                held = httpx.get(backend + "/health", timeout=10).json()
                break  # leaving the block drops our connection mid-stream
    assert held["kv_blocks_used"] > 0
    wait_for(lambda: httpx.get(backend + "/health", timeout=10).json()["in_flight"] == 0, 30, "the replica to abort the request")
    health = httpx.get(backend + "/health", timeout=10).json()
    assert health["kv_blocks_used"] == 0 and health["requests_aborted"] >= 1, health
    wait_for(lambda: backend_state(router)[backend]["outstanding_tokens"] == 0, 10, "the router to release the budget")
    assert backend_state(router)[backend]["in_flight"] == 0


def test_client_gone_before_a_plain_answer_frees_the_replica(cluster, disconnecting_client) -> None:
    """Not streamed: the router's client hangs up while the replica generates; the router closes
    its upstream request, the replica aborts the request and frees its KV blocks."""
    router, model = cluster["router"], cluster["model"]

    def running() -> list[str]:
        return [url for url, b in backend_state(router).items() if b["in_flight"] == 1]

    def healths() -> dict[str, dict]:
        return {url: httpx.get(url + "/health", timeout=10).json() for url in backend_state(router)}

    before = healths()
    busy: list[str] = []

    def started() -> bool:
        busy[:] = running()
        return bool(busy) and httpx.get(busy[0] + "/health", timeout=10).json()["kv_blocks_used"] > 0

    answer = disconnecting_client(router, "/v1/chat/completions", chat(model, "Tell me everything.", max_tokens=220), until=started)
    assert answer == b""
    backend = busy[0]
    wait_for(lambda: httpx.get(backend + "/health", timeout=10).json()["in_flight"] == 0, 30, "the replica to drop the request")
    after = httpx.get(backend + "/health", timeout=10).json()
    assert after["kv_blocks_used"] == 0, after
    assert after["requests_aborted"] == before[backend]["requests_aborted"] + 1
    assert after["requests_finished"] == before[backend]["requests_finished"]
    assert after["tokens_generated"] - before[backend]["tokens_generated"] < 220
    wait_for(lambda: backend_state(router)[backend]["outstanding_tokens"] == 0, 10, "the router to release the budget")
    assert backend_state(router)[backend]["in_flight"] == 0 and backend_state(router)[backend]["alive"]


def test_openapi_has_no_duplicate_operation_ids(cluster) -> None:
    router = cluster["router"]
    spec = httpx.get(router + "/openapi.json", timeout=10).json()
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), ids
    assert "Duplicate Operation ID" not in (cluster["folder"] / "router.log").read_text()


def test_router_sigterm_past_its_drain_timeout_ends_streams_cleanly(cluster) -> None:
    """A second router with --drain-timeout 0: SIGTERM mid-stream ends the relayed stream with an
    error event and [DONE] (not a cut connection), closes the upstream request (the replica
    aborts it) and exits 0."""
    model, folder = cluster["model"], cluster["folder"]
    router, proc = start_router([cluster["a"], cluster["b"]], folder / "router_drain.log", extra=("--drain-timeout", "0"))
    before = {url: httpx.get(url + "/health", timeout=10).json() for url in (cluster["a"], cluster["b"])}
    t0 = time.perf_counter()
    with httpx.stream("POST", router + "/v1/chat/completions", json=chat(model, "Tell me everything.", max_tokens=220, stream=True), timeout=60) as r:
        backend = r.headers["x-mlsyskit-backend"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {") and "content" in line)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    print(f"stream read in {time.perf_counter() - t0:.2f}s")
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert json.loads(rest[-2][5:])["error"]["code"] == "aborted"
    assert proc.wait(15) == 0
    log = (folder / "router_drain.log").read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    wait_for(lambda: httpx.get(backend + "/health", timeout=10).json()["in_flight"] == 0, 30, "the replica to abort the request")
    after = httpx.get(backend + "/health", timeout=10).json()
    assert after["kv_blocks_used"] == 0 and after["requests_aborted"] == before[backend]["requests_aborted"] + 1, after


def test_killing_a_replica_under_load_loses_no_request(cluster, tiny_llama_dir) -> None:
    router, model, a, b = cluster["router"], cluster["model"], cluster["a"], cluster["b"]
    prompts = [f"Write item number {i} of a shopping list." for i in range(12)]
    results: list[httpx.Response | None] = [None] * len(prompts)

    def send(i: int) -> None:
        results[i] = httpx.post(router + "/v1/chat/completions", json=chat(model, prompts[i], max_tokens=64), timeout=120)

    killer_saw: list[int] = []

    def killer() -> None:
        # SIGKILL b while it holds requests the router accepted
        wait_for(lambda: backend_state(router)[b]["in_flight"] >= 2, 60, "requests in flight on b")
        killer_saw.append(backend_state(router)[b]["in_flight"])
        b.proc.send_signal(signal.SIGKILL)

    kt = threading.Thread(target=killer)
    kt.start()
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(send, range(len(prompts))))
    kt.join()
    assert killer_saw and b.proc.wait(10) == -signal.SIGKILL

    # every accepted request was answered in full, with the greedy text the survivor gives alone
    for i, r in enumerate(results):
        assert r is not None and r.status_code == 200, (i, r and r.text)
        alone = httpx.post(a + "/v1/chat/completions", json=chat(model, prompts[i], max_tokens=64), timeout=60).json()
        assert r.json()["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    metrics = httpx.get(router + "/metrics", timeout=10).text
    retries = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("mlsyskit_router_retries_total")))
    assert retries >= 1  # the kill hit requests in flight, and they were retried on a
    assert not backend_state(router)[b]["alive"]  # out of rotation
    assert "mlsyskit_router_dead_backends 1" in metrics

    # requests keep working on the survivor only
    for i in range(3):
        r = httpx.post(router + "/v1/chat/completions", json=chat(model, f"ok {i}", max_tokens=4), timeout=60)
        assert r.status_code == 200 and r.headers["x-mlsyskit-backend"] == a

    # a replica restarted on the same address comes back into rotation
    port = int(b.rsplit(":", 1)[1])
    (b2,) = wait_ready(spawn_servers(tiny_llama_dir, cluster["folder"], 1, port=port))
    cluster["servers"].append(b2)
    assert b2 == b
    wait_for(lambda: backend_state(router)[b]["alive"], 30, "the restarted backend back in rotation")
    used = {httpx.post(router + "/v1/chat/completions", json=chat(model, f"back {i}", max_tokens=4), timeout=60).headers["x-mlsyskit-backend"] for i in range(4)}
    assert used == {a, b}
    cluster["b"] = b2


def test_503_in_openai_shape_when_every_backend_is_dead(cluster) -> None:
    router, model = cluster["router"], cluster["model"]
    for s in (cluster["a"], cluster["b"]):
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)
    r = httpx.post(router + "/v1/chat/completions", json=chat(model, "anyone?"), timeout=30)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["message"] and err["type"] and "code" in err and "param" in err
    wait_for(lambda: httpx.get(router + "/health", timeout=5).status_code == 503, 10, "router /health 503")
    assert httpx.get(router + "/v1/models", timeout=10).status_code == 503
