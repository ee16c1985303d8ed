"""The FastAPI app: OpenAI-compatible routes over an :class:`EngineService`.

``create_app(service)`` gives an ASGI app whose lifespan starts and stops the service. Routes:
``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models`` (every model the server
answers for: the chat model first, then the embedding model when the RAG router serves
/v1/embeddings; each with ``type`` and ``capabilities``), ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends server-sent
events ending with ``data: [DONE]``), plus the RAG router when given. Every error is a JSON body
in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlsyskit.errors import UserError
from mlsyskit.serve.disconnect import CancelOnDisconnect
from mlsyskit.serve.metrics import ServerMetrics
from mlsyskit.serve.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    finish_reason,
    model_not_found,
    new_id,
    now,
    openai_error,
)
from mlsyskit.serve.service import (
    EngineService,
    QueueFullError,
    RequestError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from fastapi import APIRouter

    from mlsyskit.engine import RequestOutput, SamplingParams

# Paths served without the API key: liveness, scraping and the API description.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_CLOSED = 499  # /metrics status of a request whose client left before the answer (nginx's code)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def bearer_token(header: bytes) -> bytes:
    """The credentials of an ``Authorization: Bearer TOKEN`` header (the scheme name is
    case-insensitive, RFC 7235), or b"" for another scheme or none."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def route_path(scope: Scope) -> str:
    """The path template of the route that served ``scope`` (a bounded label for /metrics), or
    "unmatched". FastAPI's own routes (/openapi.json, /docs) leave no ``route`` in the scope,
    only their ``endpoint``: found among the app's routes."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for r in getattr(scope.get("app"), "routes", ()):
            if getattr(r, "endpoint", None) is endpoint and isinstance(getattr(r, "path", None), str):
                return r.path
    return "unmatched"


class _Guard:
    """Pure ASGI middleware: API key, body-size limit, and request counts for /metrics.

    The body is read here (at most ``max_body_bytes``) and replayed to the app, so an oversize
    upload is refused with 413 whether or not it declares a Content-Length.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def _reply(self, send: Send, response: Response, scope: Scope, receive: Receive) -> None:
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        started = False

        async def send_counted(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                status[0], started = message["status"], True
            await send(message)

        try:
            await self._handle(scope, receive, send_counted)
            if not started:
                status[0] = CLIENT_CLOSED  # the client left before any answer (body unread)
        except asyncio.CancelledError:
            if not started:
                status[0] = CLIENT_CLOSED  # cancelled because the client disconnected
            raise
        finally:
            self.metrics.observe_response(route_path(scope), status[0])

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(bearer_token(given), self.key):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
                await openai_error(401, msg, "authentication_error", code="invalid_api_key")(scope, receive, send)
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await openai_error(400, "invalid Content-Length header")(scope, receive, send)
                return
            if declared > self.max_body:
                await self._too_large(scope, receive, send)
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and length is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, to see a disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"the request body is larger than the server's limit of {self.max_body} bytes"
        await openai_error(413, msg, code="request_too_large")(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One clear line from pydantic's error list (the first error), and the parameter it names."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})" if detail else "the request body is not valid JSON", None
    if kind == "missing" and param:
        return f"missing required parameter '{param}'", param
    if kind == "missing":
        return "the request needs a JSON body", None
    if not param and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return (f"invalid '{param}': {msg}{more}" if param else f"{msg}{more}"), param


def _http_error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _ended_cleanly(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE body whose failure mid-stream (the status is already sent) still ends the stream
    with an OpenAI error event and ``[DONE]`` instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        yield _sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as ``(index, output)``; closing it aborts them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: Any) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as e:  # handed to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


def create_app(
    service: EngineService,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    rag_router: APIRouter | None = None,
    max_tokens_limit: int | None = None,
    drain_timeout: float = 30.0,
) -> FastAPI:
    """The OpenAI-compatible app over ``service``.

    ``api_key``: when set, every route but /health, /metrics and the API docs needs
    ``Authorization: Bearer KEY``. ``max_body_bytes``: larger request bodies get 413.
    ``max_tokens_limit``: the most new tokens one choice may ask for (also the default when a
    request gives none). ``drain_timeout``: seconds in-flight requests get to finish at shutdown.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop(drain_timeout)

    app = FastAPI(
        title="mlsyskit OpenAI-compatible server",
        version="1",
        description=f"Serves {service.model_name} with the mlsyskit engine (batching={service.batching}).",
        lifespan=lifespan,
    )
    metrics = ServerMetrics(service)
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    app.add_middleware(CancelOnDisconnect)  # outside the guard: it sees the cancellation (499)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return openai_error(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return openai_error(exc.status_code, msg, _http_error_type(exc.status_code), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        return openai_error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def service_error(exc: Exception) -> JSONResponse:
        """The HTTP answer for an exception raised when queueing a request."""
        if isinstance(exc, QueueFullError):
            retry = str(max(1, math.ceil(exc.retry_after)))
            return openai_error(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": retry})
        if isinstance(exc, RequestError):
            return openai_error(400, str(exc), param=exc.param)
        if isinstance(exc, UserError):
            return openai_error(400, str(exc))
        if isinstance(exc, ServiceUnavailableError):
            return openai_error(503, str(exc), "server_error", code="unavailable", headers={"Retry-After": "1"})
        raise exc

    # -- the models this server answers for (GET /v1/models) ---------------------------------
    rag_paths = {getattr(r, "path", None) for r in rag_router.routes} if rag_router is not None else set()
    created = now()  # the models' "created": when this server was set up
    chat_card: dict[str, Any] = {
        "id": service.model_name, "object": "model", "created": created, "owned_by": "mlsyskit",
        "type": "chat", "capabilities": ["chat", "completion"] + ["rag"] * ("/v1/rag" in rag_paths),
        "max_model_len": service.max_model_len,
    }
    cards = [chat_card]  # the chat model first: clients that take data[0] get the one that chats
    embedder: Any = None  # the mlsyskit.serve.rag module when the RAG router serves /v1/embeddings
    if "/v1/embeddings" in rag_paths:
        from mlsyskit.serve import rag as embedder

        cards.append(embedder.embedding_model_card(created))

    def is_embedding_model(model: str) -> bool:
        """Whether ``model`` names the embedding model this server serves (or one of its aliases)."""
        return embedder is not None and embedder.is_embedding_model(model)

    def check_model(model: str) -> JSONResponse | None:
        if is_embedding_model(model):
            return embedder.not_a_chat_model(model, service.model_name)
        return model_not_found(model, service.model_name)

    def sampling(req: Any, max_tokens: int | None, prompt_len: int, i: int, default: int | None) -> SamplingParams:
        from mlsyskit.engine import SamplingParams

        if max_tokens is None:
            room = service.max_model_len - prompt_len
            max_tokens = max(1, min(x for x in (default, max_tokens_limit, room) if x is not None))
        elif max_tokens_limit is not None and max_tokens > max_tokens_limit:
            raise RequestError(f"max_tokens is {max_tokens} but this server allows at most {max_tokens_limit}", "max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=None if req.seed is None else req.seed + i,
                stop=list(req.stop or []),
            )
        except UserError as e:
            raise RequestError(str(e)) from None

    def submit(prompts: list[list[int]], req: Any, max_tokens: int | None, default: int | None) -> list[Any]:
        n = req.n or 1
        all_prompts, params = [], []
        for ids in prompts:
            for i in range(n):
                all_prompts.append(ids)
                params.append(sampling(req, max_tokens, len(ids), i, default))
        return service.submit_many(all_prompts, params)

    async def finals(streams: list[Any]) -> list[RequestOutput] | None:
        """The final output of every stream, recorded in the metrics; None if one was aborted."""
        last: dict[int, RequestOutput] = {}
        async for i, out in _merge(streams):
            last[i] = out
        outs = [last[i] for i in range(len(streams))]
        for o in outs:
            metrics.observe_output(o)
        return None if any(o.finish_reason == "abort" for o in outs) else outs

    def usage(prompt_tokens: int, outs: list[RequestOutput]) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def aborted() -> JSONResponse:
        return openai_error(503, "the server shut down before the request finished; retry", "server_error", code="aborted")

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health", summary="liveness and load")
    async def health() -> JSONResponse:
        s = service.stats()
        ok = s["accepting"] and s["engine_error"] is None
        body = {"status": "ok" if ok else ("draining" if s["engine_error"] is None else "error"), **s}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, response_model_exclude_none=True, responses=ERROR_RESPONSES)
    async def model(model_id: str) -> Any:
        if model_id == service.model_name:
            return chat_card
        if is_embedding_model(model_id):  # also its aliases, as /v1/embeddings accepts them
            return cards[1]
        listed = ", ".join(f"'{c['id']}'" for c in cards)
        return openai_error(404, f"the model '{model_id}' does not exist; this server serves {listed}", param="model", code="model_not_found")

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest) -> Any:
        bad = check_model(req.model)
        if bad is not None:
            return bad
        try:
            prompts = [service.encode_prompt(p) for p in req.prompts()]
            streams = submit(prompts, req, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        except Exception as e:
            return service_error(e)
        n = req.n or 1
        prompt_tokens = sum(len(p) for p in prompts)
        rid, created = new_id("cmpl"), now()
        echo = [service.tokenizer.decode(p) if req.echo else "" for p in prompts]
        if not req.stream:
            outs = await finals(streams)
            if outs is None:
                return aborted()
            choices = [
                {"index": i, "text": echo[i // n] + o.text, "logprobs": None, "finish_reason": finish_reason(o.finish_reason)}
                for i, o in enumerate(outs)
            ]
            return {"id": rid, "object": "text_completion", "created": created, "model": service.model_name, "choices": choices, "usage": usage(prompt_tokens, outs)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict], use: dict | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name, "choices": choices}
            if include_usage:
                body["usage"] = use
            return _sse(body)

        async def events() -> AsyncIterator[str]:
            finished: dict[int, RequestOutput] = {}
            if req.echo:
                for i in range(len(streams)):
                    yield chunk([{"index": i, "text": echo[i // n], "logprobs": None, "finish_reason": None}])
            async for i, out in _merge(streams):
                if out.finished:
                    finished[i] = out
                    metrics.observe_output(out)
                    if out.finish_reason == "abort":
                        yield _sse({"error": {"message": "the server shut down before the request finished", "type": "server_error", "param": None, "code": "aborted"}})
                        break
                if out.delta or out.finished:
                    yield chunk([{"index": i, "text": out.delta, "logprobs": None, "finish_reason": finish_reason(out.finish_reason)}])
            if include_usage and len(finished) == len(streams):
                yield chunk([], usage(prompt_tokens, list(finished.values())))
            yield "data: [DONE]\n\n"

        return StreamingResponse(_ended_cleanly(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        bad = check_model(req.model)
        if bad is not None:
            return bad
        messages = [{"role": m.template_role(), "content": m.text()} for m in req.messages]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        try:
            ids = service.chat_prompt(messages)
            streams = submit([ids], req, max_tokens, None)
        except Exception as e:
            return service_error(e)
        rid, created, name = new_id("chatcmpl"), now(), service.model_name
        if not req.stream:
            outs = await finals(streams)
            if outs is None:
                return aborted()
            choices = [
                {"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None, "finish_reason": finish_reason(o.finish_reason)}
                for i, o in enumerate(outs)
            ]
            return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": choices, "usage": usage(len(ids), outs)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict], use: dict | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
            if include_usage:
                body["usage"] = use
            return _sse(body)

        async def events() -> AsyncIterator[str]:
            finished: dict[int, RequestOutput] = {}
            for i in range(len(streams)):  # OpenAI opens each choice with the role
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            async for i, out in _merge(streams):
                if out.delta:
                    yield chunk([{"index": i, "delta": {"content": out.delta}, "logprobs": None, "finish_reason": None}])
                if out.finished:
                    finished[i] = out
                    metrics.observe_output(out)
                    if out.finish_reason == "abort":
                        yield _sse({"error": {"message": "the server shut down before the request finished", "type": "server_error", "param": None, "code": "aborted"}})
                        break
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason(out.finish_reason)}])
            if include_usage and len(finished) == len(streams):
                yield chunk([], usage(len(ids), list(finished.values())))
            yield "data: [DONE]\n\n"

        return StreamingResponse(_ended_cleanly(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    if rag_router is not None:
        app.include_router(rag_router)
    return app
