"""Bad requests, limits and backpressure against real servers: every error is a 4xx in OpenAI's
shape with a clear message, never a 500 or a traceback."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(start_server):
    """A server with an API key, a 128-token context and a 20 kB body limit."""
    return start_server(api_key=KEY, max_model_len=128, max_body_bytes=20_000)


def post(url: str, path: str, body=None, *, content: bytes | None = None, headers=None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, content=content, headers={**AUTH, **(headers or {})}, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    return err


def test_api_key_required_on_v1(guarded):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, f"{guarded}{path}", json={}, timeout=30)
        err = error_of(r, 401)
        assert err["type"] == "authentication_error" and "API key" in err["message"]
    r = httpx.get(f"{guarded}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert error_of(r, 401)["message"] == "incorrect API key"
    assert httpx.get(f"{guarded}/v1/models", headers=AUTH, timeout=30).status_code == 200
    # /health and /metrics stay open (load balancers and scrapers)
    assert httpx.get(f"{guarded}/health", timeout=30).json()["status"] == "ok"
    assert httpx.get(f"{guarded}/metrics", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_json(guarded):
    err = error_of(post(guarded, "/v1/completions", content=b'{"model": "x", ', headers={"Content-Type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    err = error_of(post(guarded, "/v1/chat/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    assert "JSON object" in err["message"]
    err = error_of(post(guarded, "/v1/chat/completions", content=b""), 400)
    assert "JSON body" in err["message"]


def test_unknown_model(guarded):
    err = error_of(post(guarded, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
        client.completions.create(model="nope", prompt="Hi", max_tokens=1)


def test_invalid_parameters(guarded):
    m = guarded.model
    chat = [{"role": "user", "content": "Hi"}]
    cases = [
        ("/v1/completions", {"model": m, "prompt": "Hi", "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
        ("/v1/completions", {"model": m, "prompt": "Hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ("/v1/chat/completions", {"model": m, "messages": chat, "temperature": -1}, "temperature", "greater than or equal to 0"),
        ("/v1/chat/completions", {"model": m, "messages": chat, "n": 0}, "n", "greater than or equal to 1"),
        ("/v1/chat/completions", {"model": m, "messages": chat, "top_p": 0}, "top_p", "greater than 0"),
        ("/v1/chat/completions", {"model": m}, "messages", "missing required parameter 'messages'"),
        ("/v1/chat/completions", {"model": m, "messages": []}, "messages", "at least 1"),
        ("/v1/chat/completions", {"model": m, "messages": "Hi"}, "messages", "list"),
        ("/v1/chat/completions", {"model": m, "messages": chat, "stop": [""]}, "stop", "non-empty"),
        ("/v1/completions", {"model": m}, "prompt", "missing required parameter 'prompt'"),
        ("/v1/completions", {"model": m, "prompt": []}, "prompt", "empty"),
        ("/v1/completions", {"model": m, "prompt": ""}, "prompt", "empty"),
        ("/v1/completions", {"model": m, "prompt": [99999999]}, "prompt", "outside the vocabulary"),
        # context limits: 128 tokens, prompt and output together
        ("/v1/completions", {"model": m, "prompt": "hello " * 300, "max_tokens": 1}, "prompt", "context holds 128"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "hi " * 300}]}, "messages", "context holds 128"),
        ("/v1/completions", {"model": m, "prompt": "Hi", "max_tokens": 500}, "max_tokens", "lower max_tokens"),
    ]
    for path, body, param, text in cases:
        err = error_of(post(guarded, path, body), 400)
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
        assert text in err["message"], (body, err)
    stats = httpx.get(f"{guarded}/health", timeout=30).json()
    assert stats["in_flight"] == 0 and stats["tokens_generated"] == 0  # nothing reached the engine


def test_openai_client_gets_the_message(guarded):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="context holds 128"):
        client.completions.create(model=guarded.model, prompt="hello " * 300, max_tokens=1)


def test_body_too_large(guarded):
    big = {"model": guarded.model, "prompt": "x" * 30_000}
    err = error_of(post(guarded, "/v1/completions", big), 413)
    assert "20000 bytes" in err["message"]

    def chunks():  # no Content-Length: the limit holds on the bytes actually sent
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(f"{guarded}/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    error_of(r, 413)


def test_unknown_route_and_method(guarded):
    err = error_of(httpx.get(f"{guarded}/v2/nothing", headers=AUTH, timeout=30), 404)
    assert "/v2/nothing" in err["message"]
    error_of(httpx.get(f"{guarded}/v1/completions", headers=AUTH, timeout=30), 405)


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*{re.escape(labels)}[^}}]*\}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_dropped_stream_frees_blocks(guarded):
    body = {"model": guarded.model, "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "stream": True}
    pieces = []
    with httpx.stream("POST", f"{guarded}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(line)
            if len(pieces) == 3:
                held = httpx.get(f"{guarded}/health", timeout=30).json()["kv_blocks_used"]
                break  # leaving the block closes the connection mid-stream
    assert held > 0
    for _ in range(200):
        health = httpx.get(f"{guarded}/health", timeout=30).json()
        if health["kv_blocks_used"] == 0 and health["in_flight"] == 0:
            break
        time.sleep(0.05)
    assert health["kv_blocks_used"] == 0 and health["in_flight"] == 0, health
    assert health["requests_aborted"] == 1 and health["tokens_generated"] < 100
    text = httpx.get(f"{guarded}/metrics", timeout=30).text
    assert _metric(text, "mlsyskit_kv_blocks_used") == 0
    assert _metric(text, "mlsyskit_requests_aborted_total") == 1


def test_queue_full_429_with_retry_after(start_server):
    url = start_server(max_queue=1, batching="none")
    body = {"model": url.model, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) <= 3, codes  # 1 running + 1 waiting (+1 raced)
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # every accepted request completed with the same greedy text
    for r in responses:
        if r.status_code == 429:
            err = error_of(r, 429)
            assert err["code"] == "queue_full" and "queue is full" in err["message"]
            assert int(r.headers["Retry-After"]) >= 1
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert _metric(metrics, "mlsyskit_http_requests_total", 'status="429"') == codes.count(429)


def test_client_gone_before_a_plain_answer_aborts_the_request(guarded, disconnecting_client):
    """A non-streamed request whose client hangs up (a timeout, a closed socket) is aborted
    at once and its KV blocks return to the pool; it does not run on to max_tokens for nobody."""

    def health() -> dict:
        return httpx.get(f"{guarded}/health", timeout=30).json()

    before = health()
    body = {"model": guarded.model, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 100, "temperature": 0}  # no "stream"
    answer = disconnecting_client(guarded, "/v1/completions", body, headers=AUTH,
                                  until=lambda: (h := health())["running"] == 1 and h["kv_blocks_used"] > 0)
    assert answer == b""  # still generating when the client left
    for _ in range(200):
        after = health()
        if after["in_flight"] == 0:
            break
        time.sleep(0.05)
    assert after["in_flight"] == 0 and after["running"] == 0 and after["kv_blocks_used"] == 0, after
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_finished"] == before["requests_finished"]
    assert after["tokens_generated"] - before["tokens_generated"] < 100  # cut short
    text = httpx.get(f"{guarded}/metrics", timeout=30).text
    assert _metric(text, "mlsyskit_requests_aborted_total") == after["requests_aborted"]
    assert _metric(text, "mlsyskit_http_requests_total", 'route="/v1/completions",status="499"') == 1


def test_bearer_scheme_is_case_insensitive(guarded):
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.get(f"{guarded}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30)
        assert r.status_code == 200, (scheme, r.text)
    for header in (f"Basic {KEY}", KEY, f"Bearer{KEY}", "Bearer"):
        err = error_of(httpx.get(f"{guarded}/v1/models", headers={"Authorization": header}, timeout=30), 401)
        assert err["message"] == "incorrect API key", header


def test_metrics_label_fastapi_own_routes(guarded):
    assert httpx.get(f"{guarded}/openapi.json", timeout=30).status_code == 200
    assert httpx.get(f"{guarded}/docs", timeout=30).status_code == 200
    text = httpx.get(f"{guarded}/metrics", timeout=30).text
    assert _metric(text, "mlsyskit_http_requests_total", 'route="/openapi.json",status="200"') >= 1
    assert _metric(text, "mlsyskit_http_requests_total", 'route="/docs",status="200"') >= 1
    assert 'route="unmatched",status="200"' not in text
