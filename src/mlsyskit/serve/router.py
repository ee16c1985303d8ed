"""A load-balancing router in front of engine replicas (`mlsyskit router`).

Each request goes to the live backend with the **least outstanding tokens**: the router's own
estimate of the work each backend still has (prompt length / 4 + max_tokens of the requests it
forwarded there and that have not finished). Round-robin would pile long requests on one
replica while another idles; outstanding tokens follow the actual work.

Failures: a backend that fails *before answering* (connection refused or reset, a 5xx status
before any byte reached the client) is marked dead and the request is retried on another live
backend, so a request the router accepted is not lost when one replica dies. Once a streamed
answer has started, its bytes are already with the client and it cannot be replayed: the
router ends that stream with an OpenAI-shaped error event. A 429 from one backend is tried on
the others before the client gets it. A health loop (GET /health every `health_interval` s)
takes dead backends out of rotation and puts recovered ones back.

`POST /v1/documents` is sent to every live backend (each replica holds its own RAG corpus).

A client that goes away closes its upstream request, streamed or not (the replica aborts the
request). Shutdown drains with the listener open (new requests and /health get 503); what is
still open at the deadline ends with a 503 or, for a stream, an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from mlsyskit.cluster.routing import StreamTokens, completion_tokens, request_tokens
from mlsyskit.serve.disconnect import CancelOnDisconnect

log = logging.getLogger("mlsyskit.router")

DEFAULT_MAX_TOKENS = 128  # the router's work estimate when a request gives no max_tokens
MAX_BODY_BYTES = 8 * 1024 * 1024
# Request headers passed through to the backend (hop-by-hop and length headers are not).
PASS_HEADERS = ("authorization", "content-type", "accept", "openai-organization", "openai-project", "x-request-id")
# Response headers passed back to the client.
PASS_BACK = ("content-type", "retry-after", "x-request-id", "cache-control")


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Backend:
    """One replica as the router sees it."""

    url: str
    alive: bool = True
    draining: bool = False
    outstanding_tokens: int = 0
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    health: dict[str, Any] = field(default_factory=dict)  # the last GET /health body
    slow_polls: int = 0  # health checks in a row that timed out
    last_change: float = field(default_factory=time.monotonic)

    @property
    def routable(self) -> bool:
        return self.alive and not self.draining

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.url, "alive": self.alive, "draining": self.draining,
            "outstanding_tokens": self.outstanding_tokens, "in_flight": self.in_flight,
            "requests": self.requests, "failures": self.failures,
        }


@dataclass
class Upstream:
    """A backend's answer: a read body (`resp.content`), or for a 200 stream its first chunk and
    the iterator of the rest."""

    resp: Any
    backend: Backend
    release: Callable[[], None]
    first: bytes
    chunks: AsyncIterator[bytes] | None


class NoBackend(Exception):
    """No live backend could take the request."""


def estimate_tokens(body: Any) -> int:
    """Router-side work estimate of one request: ~4 characters per prompt token + max_tokens."""
    if not isinstance(body, dict):
        return DEFAULT_MAX_TOKENS
    chars = 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        # a list of strings, or token ids (one token each: count 4 "characters")
        chars += sum(len(p) if isinstance(p, str) else 4 for p in prompt)
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):  # OpenAI content parts
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if isinstance(body.get("query"), str):
        chars += len(body["query"]) + 2000  # RAG prompts carry the retrieved documents
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = mt if isinstance(mt, int) and mt > 0 else DEFAULT_MAX_TOKENS
    n = body.get("n")
    n = n if isinstance(n, int) and 1 <= n <= 128 else 1
    return chars // 4 + 1 + max_tokens * n


class Router:
    """Backend pool, balancing and retries; `build_app` puts HTTP in front of it."""

    def __init__(
        self,
        backends: list[str],
        *,
        health_interval: float = 1.0,
        health_timeout: float = 2.0,
        request_timeout: float = 600.0,
        api_key: str | None = None,
        latency_window_s: float = 30.0,
        policy: Any = None,
    ) -> None:
        self.backends: dict[str, Backend] = {}
        # a placement policy of mlsyskit.cluster (cluster.routing.RoutingPolicy); None: least
        # outstanding tokens, below
        self.policy = policy
        for url in backends:
            self.add_backend(url)
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.request_timeout = request_timeout
        self.api_key = api_key
        self.retries = 0
        self.rejected_no_backend = 0
        self.requests_total: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency_window_s = latency_window_s
        self._latencies: collections.deque[tuple[float, float]] = collections.deque()
        self._rr = itertools.count()  # tie-break among equally loaded backends
        self._client: Any = None
        self._health_task: asyncio.Task | None = None
        self.on_health: list[Callable[[], Awaitable[None]]] = []  # hooks run after each health pass
        self.extra_metrics: Callable[[], str] | None = None  # text appended to /metrics
        self.stopping = False  # shutting down: new requests get 503, nothing is retried
        self._waits: set[anyio.CancelScope] = set()  # the upstream waits abort_all() cancels

    # -- pool -------------------------------------------------------------------------------
    def add_backend(self, url: str) -> Backend:
        url = url.rstrip("/")
        b = self.backends.get(url)
        if b is None:
            b = self.backends[url] = Backend(url)
        b.alive, b.draining = True, False
        return b

    def remove_backend(self, url: str) -> None:
        self.backends.pop(url.rstrip("/"), None)

    def live(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.routable]

    def pick(self, exclude: Collection[str] = (), req: Any = None) -> Backend:
        """The routable backend the policy picks for ``req`` (``--policy``), else (or when the
        policy finds none) the one with the least outstanding tokens (ties: fewest in flight,
        then rotate)."""
        cands = [b for b in self.backends.values() if b.routable and b.url not in exclude]
        if not cands:
            raise NoBackend
        if self.policy is not None and req is not None:
            chosen = self.policy.pick(cands, req)
            if chosen is not None:
                return chosen
        k = next(self._rr)
        n = len(cands)
        order = {b.url: (i - k) % n for i, b in enumerate(cands)}
        return min(cands, key=lambda b: (b.outstanding_tokens, b.in_flight, order[b.url]))

    def mark_dead(self, b: Backend, why: str) -> None:
        if b.alive:
            log.warning("backend %s marked dead: %s", b.url, why)
            b.alive = False
            b.last_change = time.monotonic()
        b.failures += 1

    def observe_latency(self, seconds: float) -> None:
        now = time.monotonic()
        self._latencies.append((now, seconds))
        while self._latencies and self._latencies[0][0] < now - self.latency_window_s:
            self._latencies.popleft()

    def latency_quantile(self, q: float) -> float | None:
        """Quantile of end-to-end latencies of requests finished in the last window (None if none)."""
        now = time.monotonic()
        xs = sorted(s for t, s in self._latencies if t >= now - self.latency_window_s)
        if not xs:
            return None
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        timeout = httpx.Timeout(self.request_timeout, connect=5.0)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._client is not None:
            await self._client.aclose()

    def begin_drain(self) -> None:
        """Shutdown starts: new requests get 503 and /health answers 503; the requests in flight
        go on. Health checks stop (draining backends answer 503 and are not dead)."""
        self.stopping = True
        if self._health_task is not None:
            self._health_task.cancel()

    @property
    def in_flight(self) -> int:
        """Requests forwarded and not yet relayed to the end, over every backend."""
        return sum(b.in_flight for b in self.backends.values())

    def abort_all(self) -> None:
        """End every request in flight now: a plain one gets a 503, a stream an error event and
        ``[DONE]``; their upstream requests are closed (so the backends abort them too)."""
        for scope in list(self._waits):
            scope.cancel()

    async def wait_upstream(self, aw: Awaitable[Any]) -> tuple[bool, Any]:
        """``(True, result)`` of ``aw``, or ``(False, None)`` if abort_all() cut the wait."""
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                return True, await aw
            finally:
                self._waits.discard(scope)
        return False, None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def check(self, b: Backend) -> bool:
        """One health probe; updates b.alive and b.health. A refused connection or an error
        status takes b out of rotation at once; a slow answer only on the second poll in a row
        (a replica busy with a big batch may answer late, and is not dead)."""
        slow = False
        try:
            r = await self._client.get(b.url + "/health", timeout=self.health_timeout, headers=self._auth())
            ok = r.status_code == 200
            if ok:
                with contextlib.suppress(ValueError):
                    body = r.json()
                    b.health = body if isinstance(body, dict) else {}
        except httpx.TimeoutException:
            ok, slow = False, True
        except Exception:  # noqa: BLE001 - any other failure to answer means not healthy
            ok = False
        b.slow_polls = b.slow_polls + 1 if slow else 0
        if ok and not b.alive:
            log.warning("backend %s is healthy again: back in rotation", b.url)
            b.alive, b.last_change = True, time.monotonic()
        elif not ok and b.alive and (not slow or b.slow_polls >= 2):
            self.mark_dead(b, "health check timed out twice" if slow else "health check failed")
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in list(self.backends.values())))
        for hook in self.on_health:
            await hook()

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must survive a bad hook
                log.exception("health loop")
            await asyncio.sleep(self.health_interval)

    async def drain(self, url: str, timeout: float = 300.0) -> bool:
        """Stop routing to `url` and wait until its in-flight requests finished (True) or
        `timeout` passed (False)."""
        b = self.backends.get(url.rstrip("/"))
        if b is None:
            return True
        b.draining = True
        deadline = time.monotonic() + timeout
        while b.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return b.in_flight == 0

    # -- forwarding --------------------------------------------------------------------------
    async def forward(self, method: str, path: str, body: bytes, headers: dict[str, str], stream: bool, cost: int, req: Any = None) -> Upstream:
        """Send the request to the least-loaded backend, retrying on others while a backend
        fails before answering. The caller must call `release()` of the result once the answer
        is relayed (it returns the request's tokens to the backend's budget)."""
        tried: set[str] = set()
        last_429: Upstream | None = None
        while True:
            try:
                b = self.pick(tried, req)
            except NoBackend:
                if last_429 is not None:
                    return last_429
                raise
            tried.add(b.url)
            up = await self._attempt(b, method, path, body, headers, stream, cost)
            if up is None:  # failed before answering: b is marked dead, try another
                self.retries += 1
                continue
            if up.resp.status_code == 429:  # full: another replica may have room
                last_429 = up
                continue
            return up

    async def _attempt(self, b: Backend, method: str, path: str, body: bytes, headers: dict[str, str], stream: bool, cost: int) -> Upstream | None:
        """One try on backend b: its answer, or None when it failed before answering."""
        b.outstanding_tokens += cost
        b.in_flight += 1
        b.requests += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                b.outstanding_tokens -= cost
                b.in_flight -= 1

        resp = None
        try:
            req = self._client.build_request(method, b.url + path, content=body, headers=headers)
            resp = await self._client.send(req, stream=True)
            if resp.status_code >= 500 and not self.stopping:  # stopping: the answer is final
                self.mark_dead(b, f"HTTP {resp.status_code}")
                await _close(resp)
                release()
                return None
            if not stream or resp.status_code != 200:
                await resp.aread()  # a replica dying mid-answer shows up here: retried
                await resp.aclose()
                if resp.status_code == 429:
                    release()
                    return Upstream(resp, b, lambda: None, b"", None)
                return Upstream(resp, b, release, b"", None)
            # Streaming: wait for the first bytes before committing to this backend, so a
            # replica that dies before it produced anything is still retried elsewhere.
            chunks = resp.aiter_raw()
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = b""
            return Upstream(resp, b, release, first, chunks)
        except httpx.TransportError as e:
            release()
            if resp is not None:
                await _close(resp)
            if isinstance(e, httpx.TimeoutException) or self.stopping:
                raise  # slow, not dead: the client gets a 504 (stopping: a 502)
            # refused, reset, closed before the answer: out of rotation, retried elsewhere
            self.mark_dead(b, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return None
        except BaseException:
            # our own client went away (cancellation) or a bug: never leak the budget
            release()
            if resp is not None:
                await _close(resp)
            raise


def build_app(router: Router, *, lifespan_hooks: tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]] | None = None) -> Any:
    """The FastAPI app of `router`. lifespan_hooks: (after start, before stop) coroutines, used
    by `serve --replicas` to manage worker processes in the same event loop."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        if lifespan_hooks:
            await lifespan_hooks[0]()
        try:
            yield
        finally:
            if lifespan_hooks:
                await lifespan_hooks[1]()
            await router.stop()

    app = FastAPI(title="mlsyskit router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CancelOnDisconnect)  # a client gone mid-request closes its upstream request

    def shutting_down() -> JSONResponse:
        return JSONResponse(
            error_body("the server is shutting down; retry on another server", "service_unavailable", "shutting_down"),
            status_code=503, headers={"Retry-After": "1"},
        )

    def unavailable() -> JSONResponse:
        if router.stopping:
            return shutting_down()
        router.rejected_no_backend += 1
        return JSONResponse(
            error_body("no backend replica is available; retry later", "service_unavailable", "no_backend"),
            status_code=503, headers={"Retry-After": "1"},
        )

    def relay_headers(resp: Any, b: Backend) -> dict[str, str]:
        out = {k: v for k, v in resp.headers.items() if k.lower() in PASS_BACK}
        out["x-mlsyskit-backend"] = b.url
        return out

    @app.get("/health")
    async def health() -> JSONResponse:
        live = [] if router.stopping else router.live()
        body = {
            "status": "draining" if router.stopping else ("ok" if live else "unavailable"),
            "live_backends": len(live),
            "backends": [b.snapshot() for b in router.backends.values()],
            "queue_depth": sum(_queue(b) for b in live),
            "running": sum(b.in_flight for b in live),
        }
        if router.policy is not None:
            body["policy"] = router.policy.describe()
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = router_metrics(router)
        if router.extra_metrics is not None:
            text += router.extra_metrics()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy(request, "/v1/models")

    @app.post("/v1/documents")
    async def documents(request: Request) -> Response:
        """Broadcast: every replica keeps its own RAG corpus, so every live one gets the documents."""
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASS_HEADERS}
        live = router.live()
        if not live or router.stopping:
            return unavailable()

        async def one(b: Backend) -> Any:
            try:
                return await router._client.post(b.url + "/v1/documents", content=body, headers=headers)
            except Exception as e:  # noqa: BLE001
                return e

        results = await asyncio.gather(*(one(b) for b in live))
        good = [r for r in results if not isinstance(r, BaseException)]
        if not good:
            return unavailable()
        worst = max(good, key=lambda r: r.status_code)  # a 4xx from one replica is the answer
        return Response(worst.content, status_code=worst.status_code, media_type=worst.headers.get("content-type"))

    # One route per method: a route with several methods gives them one operation id, which
    # FastAPI reports as "Duplicate Operation ID" whenever /openapi.json is built.
    @app.get("/v1/{rest:path}")
    async def v1_get(request: Request, rest: str) -> Response:
        return await proxy(request, "/v1/" + rest)

    @app.post("/v1/{rest:path}")
    async def v1_post(request: Request, rest: str) -> Response:
        return await proxy(request, "/v1/" + rest)

    @app.post("/rag")
    async def rag(request: Request) -> Response:
        return await proxy(request, "/rag")

    async def proxy(request: Request, path: str) -> Response:
        if router.stopping:
            return shutting_down()
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse(error_body(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", "invalid_request_error", "body_too_large"), status_code=413)
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                parsed = None  # the backend answers bad JSON with its own 400
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        cost = estimate_tokens(parsed) if request.method == "POST" else 0
        req = None
        if router.policy is not None and request.method == "POST":
            req = router.policy.request(*request_tokens(parsed))
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASS_HEADERS}
        if request.url.query:
            path = path + "?" + request.url.query
        t0 = time.perf_counter()
        try:
            answered, up = await router.wait_upstream(router.forward(request.method, path, body, headers, stream, cost, req))
        except NoBackend:
            return unavailable()
        except Exception as e:  # noqa: BLE001
            if isinstance(e, httpx.TimeoutException):  # not lost, just too slow
                return JSONResponse(error_body("the backend did not answer in time", "timeout", "backend_timeout"), status_code=504)
            if isinstance(e, httpx.TransportError) and router.stopping:
                return JSONResponse(error_body("the backend stopped before it answered", "server_error", "backend_stopped"), status_code=502)
            raise
        if not answered:  # abort_all() at the shutdown deadline
            return JSONResponse(error_body("the server shut down before the request finished; retry", "server_error", "aborted"), status_code=503)
        resp, b = up.resp, up.backend
        router.requests_total[(b.url, resp.status_code)] += 1
        if up.chunks is None:
            up.release()
            if resp.status_code == 200:
                router.observe_latency(time.perf_counter() - t0)
                if req is not None and (n := completion_tokens(resp.content)) is not None:
                    router.policy.finished(req, n)  # a learning policy (predict) learns online
            return Response(resp.content, status_code=resp.status_code, headers=relay_headers(resp, b))

        counter = StreamTokens() if req is not None else None

        async def relay() -> AsyncIterator[bytes]:
            if up.first:
                if counter is not None:
                    counter.feed(up.first)
                yield up.first
            try:
                while True:
                    # each wait is cancellable by abort_all(), never a yield inside the scope
                    answered, chunk = await router.wait_upstream(anext(up.chunks, None))
                    if not answered:
                        err = error_body("the server shut down before the request finished", "server_error", "aborted")
                        yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
                        return
                    if chunk is None:
                        break
                    if counter is not None:
                        counter.feed(chunk)
                    yield chunk
            except httpx.TransportError as e:
                # The replica failed mid-stream: bytes already reached the client, so the answer
                # cannot be replayed elsewhere; end the stream with an error the client can see.
                if not isinstance(e, httpx.TimeoutException) and not router.stopping:
                    router.mark_dead(b, f"{type(e).__name__} mid-stream")
                err = error_body("the replica serving this stream failed; retry the request", "server_error", "replica_failed")
                yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
                return
            router.observe_latency(time.perf_counter() - t0)
            if counter is not None:
                router.policy.finished(req, counter.tokens)

        return _RelayResponse(up, relay(), status_code=200, headers=relay_headers(resp, b), media_type=resp.headers.get("content-type", "text/event-stream"))

    return app


class _RelayResponse(StreamingResponse):
    """A streamed answer that always closes its upstream response and returns its token budget,
    however it ends: finished, failed, or our client gone (even before the first byte). Closing
    the upstream is how the replica learns the client left, so it frees the KV blocks at once."""

    def __init__(self, up: Upstream, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.up = up

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self.up.resp)
            self.up.release()


async def _close(resp: Any) -> None:
    """Close an upstream response even inside a cancelled task (the close must reach the
    replica: that is how it learns our client left and frees the request's KV blocks)."""
    import anyio

    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await resp.aclose()


def _queue(b: Backend) -> int:
    """Waiting requests on a backend: its own /health report when it gives one, else 0."""
    h = b.health
    for key in ("queue_depth", "waiting", "queued", "num_waiting"):
        v = h.get(key)
        if isinstance(v, int | float):
            return int(v)
    return 0


def router_metrics(router: Router) -> str:
    """Prometheus text of the router's own counters."""
    lines = [
        "# HELP mlsyskit_router_backend_outstanding_tokens Router-side estimate of the tokens in flight per backend.",
        "# TYPE mlsyskit_router_backend_outstanding_tokens gauge",
    ]
    bs = list(router.backends.values())
    for b in bs:
        lines.append(f'mlsyskit_router_backend_outstanding_tokens{{backend="{b.url}"}} {b.outstanding_tokens}')
    lines += ["# HELP mlsyskit_router_backend_in_flight Requests in flight per backend.", "# TYPE mlsyskit_router_backend_in_flight gauge"]
    for b in bs:
        lines.append(f'mlsyskit_router_backend_in_flight{{backend="{b.url}"}} {b.in_flight}')
    lines += ["# HELP mlsyskit_router_backend_alive 1 if the backend is in rotation.", "# TYPE mlsyskit_router_backend_alive gauge"]
    for b in bs:
        lines.append(f'mlsyskit_router_backend_alive{{backend="{b.url}"}} {int(b.routable)}')
    lines += ["# HELP mlsyskit_router_backend_failures_total Failures seen per backend.", "# TYPE mlsyskit_router_backend_failures_total counter"]
    for b in bs:
        lines.append(f'mlsyskit_router_backend_failures_total{{backend="{b.url}"}} {b.failures}')
    lines += ["# HELP mlsyskit_router_requests_total Answered requests by backend and status.", "# TYPE mlsyskit_router_requests_total counter"]
    for (url, status), n in sorted(router.requests_total.items()):
        lines.append(f'mlsyskit_router_requests_total{{backend="{url}",status="{status}"}} {n}')
    dead = sum(1 for b in bs if not b.alive)
    p90 = router.latency_quantile(0.9)
    lines += [
        "# HELP mlsyskit_router_retries_total Requests retried on another backend after one failed before answering.",
        "# TYPE mlsyskit_router_retries_total counter",
        f"mlsyskit_router_retries_total {router.retries}",
        "# HELP mlsyskit_router_dead_backends Backends out of rotation because they failed.",
        "# TYPE mlsyskit_router_dead_backends gauge",
        f"mlsyskit_router_dead_backends {dead}",
        "# HELP mlsyskit_router_no_backend_total Requests answered 503 because no backend was alive.",
        "# TYPE mlsyskit_router_no_backend_total counter",
        f"mlsyskit_router_no_backend_total {router.rejected_no_backend}",
        "# HELP mlsyskit_router_latency_p90_seconds p90 end-to-end latency over the last window.",
        "# TYPE mlsyskit_router_latency_p90_seconds gauge",
        f"mlsyskit_router_latency_p90_seconds {p90 if p90 is not None else 'NaN'}",
    ]
    return "\n".join(lines) + "\n"


def run_router(backends: list[str], host: str = "127.0.0.1", port: int = 8000, *, drain_timeout: float = 30.0, **kwargs: Any) -> int:
    """Serve the router until SIGINT/SIGTERM; 0 after a graceful stop: while it drains (new
    requests 503, /health 503), the requests in flight get ``drain_timeout`` seconds to finish,
    then they are ended cleanly (see :class:`mlsyskit.serve.graceful.GracefulServer`)."""
    import uvicorn

    from mlsyskit.serve.graceful import GracefulServer

    router = Router(backends, **kwargs)
    app = build_app(router)
    server = GracefulServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning"),
        drain_timeout=drain_timeout, drain=router.begin_drain, idle=lambda: router.in_flight == 0, abort=router.abort_all,
    )
    server.run()
    return 0
