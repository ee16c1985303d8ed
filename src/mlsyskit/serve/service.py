"""`EngineService`: the bridge between asyncio request handlers and the synchronous `LLMEngine`.

One background thread owns the engine. Handlers submit requests through a thread-safe inbox and
read the engine's output snapshots from an ``asyncio.Queue`` per request (delivered with
``loop.call_soon_threadsafe``). The thread sleeps on a condition variable when there is no work.

Three ways to feed the engine, for comparison (``batching=``):

* ``continuous``: every request goes to the engine as soon as it arrives; the engine's
  continuous-batching scheduler lets it join the running batch at the next step.
* ``none``: the naive per-request baseline, one request in the engine at a time, FIFO (as if each
  request called ``generate`` on its own).
* ``window``: the course's queue batching; when the engine is idle, wait until ``max_batch_size``
  requests are pending or the oldest has waited ``max_wait_ms``, run that batch to completion,
  then take the next one.

Backpressure: at most ``max_queue`` requests wait (accepted, not yet running in the engine); one
more raises :class:`QueueFullError` (HTTP 429) instead of growing an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlsyskit.errors import UserError

if TYPE_CHECKING:
    from mlsyskit.engine import LLMEngine, RequestOutput, SamplingParams

BATCHING_MODES = ("continuous", "window", "none")


class QueueFullError(Exception):
    """The request queue is full: answer 429 and ask the client to retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestError(ValueError):
    """A request the engine cannot serve as asked (HTTP 400); ``param`` names the bad field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ServiceUnavailableError(Exception):
    """The service is not running (not started yet, or shutting down): HTTP 503."""


@dataclass
class _Track:
    """The service's view of one request."""

    request_id: str
    prompt_ids: list[int]
    params: Any
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submit_time: float = field(default_factory=time.perf_counter)
    in_engine: bool = False
    done: bool = False


class _Stream:
    """Async iterator over one request's output snapshots.

    Leaving early (``aclose``, a cancelled ``await``, or dropping the iterator) aborts the request,
    which frees its KV blocks at the engine's next loop turn.
    """

    def __init__(self, service: EngineService, track: _Track) -> None:
        self._service = service
        self._track = track
        self._finished = False

    @property
    def request_id(self) -> str:
        return self._track.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._track.prompt_ids

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._track.queue.get()
        except BaseException:  # cancelled (client gone, shutdown): stop the request now
            self._close()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finished:
            self._finished = True
        return item

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._service._abort(self._track.request_id)

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:  # dropped without being drained
        with contextlib.suppress(Exception):
            self._close()


class EngineService:
    """Serve one :class:`~mlsyskit.engine.LLMEngine` to many concurrent asyncio callers."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        model_name: str,
        batching: str = "continuous",
        max_batch_size: int = 8,
        max_wait_ms: float = 50.0,
        max_queue: int = 256,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise UserError(f"unknown batching {batching!r}; use one of {', '.join(BATCHING_MODES)}")
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise UserError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 0:
            raise UserError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.model_name = model_name
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self._cond = threading.Condition()
        # Guarded by _cond: the inbox, the request table and the counters read by stats().
        self._inbox: list[tuple[str, Any]] = []
        self._tracks: dict[str, _Track] = {}
        self._num_running = 0  # requests the engine's scheduler is running (published per loop)
        self._peak_running = 0
        self._stopping = False
        self._accepting = False
        self._thread: threading.Thread | None = None
        # Engine-thread state, published through _stats under _cond.
        self._pending: collections.deque[_Track] = collections.deque()
        self._counter = itertools.count()
        self._tokens_generated = 0
        self._requests_finished = 0
        self._requests_aborted = 0
        self._kv_used = 0
        self._kv_total = engine.block_manager.num_blocks if engine.block_manager is not None else 0
        self._kv_tiers: dict[str, float] = {}  # KV tier counters, copied each step
        self._latency_ema: float | None = None
        self._started_at = time.time()
        self._error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread; requests are accepted from now on."""
        if self._thread is not None:
            return
        self._stopping = False
        self._accepting = True
        self._started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="mlsyskit-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Stop accepting new requests (they get :class:`ServiceUnavailableError`, HTTP 503);
        in-flight ones go on."""
        with self._cond:
            self._accepting = False

    def abort_all(self) -> None:
        """Abort every in-flight request now (callers get ``finish_reason="abort"``)."""
        with self._cond:
            for rid in self._tracks:
                self._inbox.append(("abort", rid))
            self._cond.notify_all()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``drain_timeout`` s, abort the
        rest (their callers get ``finish_reason="abort"``), then stop the engine thread."""
        self.drain()
        deadline = time.monotonic() + max(0.0, drain_timeout)
        while time.monotonic() < deadline:
            with self._cond:
                if not self._tracks:
                    break
            await asyncio.sleep(0.02)
        with self._cond:
            for rid in list(self._tracks):
                self._inbox.append(("abort", rid))
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished (queued or running)."""
        with self._cond:
            return len(self._tracks)

    # -- prompts and validation ----------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt (or checked ids); :class:`RequestError` if it is empty,
        outside the vocabulary or does not fit the context."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty: give at least one token", "prompt")
        vocab = self.engine.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the model's context holds {self.max_model_len} "
                "(at least one must be left to generate); shorten the prompt",
                "prompt",
            )
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ready for the reply.

        The messages' text is encoded as text: a typed ``<|im_start|>`` or ``<|im_end|>`` stays
        characters, never the special token, so a user cannot fake a system turn."""
        try:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except UserError as e:
            raise RequestError(str(e), "messages") from None
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the messages take {len(ids)} tokens but the model's context holds {self.max_model_len} "
                "(at least one must be left to generate); shorten the conversation",
                "messages",
            )
        return ids

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if params.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {params.max_tokens}", "max_tokens")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's context holds {self.max_model_len} tokens, but the prompt has {len(ids)} "
                f"and max_tokens asks for {params.max_tokens} more; lower max_tokens to at most "
                f"{self.max_model_len - len(ids)} or shorten the prompt",
                "max_tokens",
            )
        bm = self.engine.block_manager
        if bm is not None and bm.blocks_needed(len(ids) + params.max_tokens) > bm.num_blocks:
            raise RequestError(
                f"this request needs {bm.blocks_needed(len(ids) + params.max_tokens)} KV blocks but the "
                f"server's pool has {bm.num_blocks}; lower max_tokens",
                "max_tokens",
            )

    # -- submitting ----------------------------------------------------------------------------
    def _waiting_locked(self) -> int:
        return len(self._tracks) - self._num_running

    def _retry_after_locked(self) -> float:
        ema = self._latency_ema if self._latency_ema is not None else 1.0
        return max(1.0, round(ema, 1))

    def submit_many(self, prompts: list[str | list[int]], params: list[SamplingParams]) -> list[_Stream]:
        """Queue several requests at once, all or none (``n`` choices of one API call).

        Raises :class:`RequestError` (bad request), :class:`QueueFullError` (backpressure) or
        :class:`ServiceUnavailableError` (stopped) before anything is queued."""
        loop = asyncio.get_running_loop()
        if len(prompts) > max(1, self.max_queue):
            raise RequestError(
                f"this call makes {len(prompts)} requests (prompts x n) but the server queues at most "
                f"{max(1, self.max_queue)}; lower n or send fewer prompts",
                "n",
            )
        tracks = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = self.encode_prompt(prompt)
            self._validate(ids, p)
            rid = f"req-{uuid.uuid4().hex[:16]}"
            tracks.append(_Track(rid, ids, p, loop, asyncio.Queue()))
        with self._cond:
            if not self._accepting or self._thread is None:
                raise ServiceUnavailableError("the server is not accepting requests (starting or shutting down)")
            waiting = self._waiting_locked()
            if waiting + len(tracks) > self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({waiting} waiting, limit {self.max_queue}); retry later",
                    self._retry_after_locked(),
                )
            for t in tracks:
                self._tracks[t.request_id] = t
                self._inbox.append(("add", t))
            self._cond.notify_all()
        return [_Stream(self, t) for t in tracks]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> _Stream:
        """Queue one request; iterate the returned object for output snapshots (``.delta`` is the
        new text). Validation and backpressure errors are raised here, before anything streams.
        Stopping the iteration early aborts the request and frees its KV blocks."""
        return self.submit_many([prompt], [params])[0]

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> RequestOutput:
        """Queue one request and return its final output."""
        stream = self.stream(prompt, params)
        out = None
        try:
            async for snapshot in stream:
                out = snapshot
        finally:
            await stream.aclose()
        assert out is not None
        return out

    def _abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._tracks:
                self._inbox.append(("abort", request_id))
                self._cond.notify_all()

    # -- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for /health and /metrics."""
        with self._cond:
            waiting = self._waiting_locked()
            return {
                "model": self.model_name,
                "batching": self.batching,
                "accepting": self._accepting,
                "queue_depth": waiting,
                "max_queue": self.max_queue,
                "running": self._num_running,
                "peak_running": self._peak_running,
                "in_flight": len(self._tracks),
                "kv_blocks_used": self._kv_used,
                "kv_blocks_free": self._kv_total - self._kv_used,
                "kv_blocks_total": self._kv_total,
                "kv_tiers": dict(self._kv_tiers),
                "tokens_generated": self._tokens_generated,
                "requests_finished": self._requests_finished,
                "requests_aborted": self._requests_aborted,
                "engine_steps": self.engine.num_steps,
                "max_model_len": self.max_model_len,
                "uptime_s": round(time.time() - self._started_at, 3),
                "engine_error": self._error,
            }

    # -- the engine thread -------------------------------------------------------------------
    def _deliver(self, track: _Track, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            track.loop.call_soon_threadsafe(track.queue.put_nowait, item)

    def _finish_locked(self, track: _Track, out: RequestOutput | None) -> None:
        track.done = True
        self._tracks.pop(track.request_id, None)
        if out is not None and out.finish_reason == "abort":
            self._requests_aborted += 1
        else:
            self._requests_finished += 1
            if out is not None and out.latency is not None:
                a = 0.2  # smooth the latency used for Retry-After
                self._latency_ema = out.latency if self._latency_ema is None else (1 - a) * self._latency_ema + a * out.latency

    def _admit(self) -> float | None:
        """Move pending requests into the engine as the batching mode allows; returns how long
        to wait before trying again (window mode), or None."""
        engine = self.engine
        if not self._pending:
            return None
        if self.batching == "continuous":
            batch = list(self._pending)
            self._pending.clear()
        elif engine.has_unfinished():
            return None  # none/window: the previous request/batch runs to completion first
        elif self.batching == "none":
            batch = [self._pending.popleft()]
        else:  # window
            waited = time.perf_counter() - self._pending[0].submit_time
            if len(self._pending) < self.max_batch_size and waited < self.max_wait_s:
                return self.max_wait_s - waited
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
        for t in batch:
            try:
                engine.add_request(t.prompt_ids, t.params, request_id=t.request_id)
                t.in_engine = True
            except Exception as e:  # validated before queueing; anything left is the caller's
                with self._cond:
                    self._finish_locked(t, None)
                err = RequestError(str(e)) if isinstance(e, UserError) else e
                self._deliver(t, err)
        return None

    def _handle_inbox(self, inbox: list[tuple[str, Any]]) -> None:
        for kind, item in inbox:
            if kind == "add":
                if not item.done:
                    self._pending.append(item)
                continue
            with self._cond:
                track = self._tracks.get(item)
            if track is None or track.done:
                continue
            out = self.engine.abort(item) if track.in_engine else None
            if not track.in_engine:
                with contextlib.suppress(ValueError):
                    self._pending.remove(track)
            if out is None:
                from mlsyskit.engine.outputs import RequestOutput

                out = RequestOutput(item, track.prompt_ids, finish_reason="abort", finish_time=time.perf_counter())
            out.arrival_time = track.submit_time
            with self._cond:
                self._finish_locked(track, out)
            self._deliver(track, out)

    def _publish_locked(self) -> None:
        engine = self.engine
        self._num_running = len(engine.scheduler.running)
        self._peak_running = max(self._peak_running, self._num_running)
        bm = engine.block_manager
        self._kv_used = bm.num_blocks - bm.num_free if bm is not None else 0
        self._kv_tiers = engine.kv_tier_stats()

    def _run(self) -> None:
        engine = self.engine
        timeout: float | None = None
        while True:
            with self._cond:
                if not (self._inbox or self._stopping or engine.has_unfinished()):
                    if not self._pending:  # idle: sleep until a submission or stop()
                        while not (self._inbox or self._stopping):
                            self._cond.wait()
                    elif timeout is not None and timeout > 0:  # window not full yet
                        self._cond.wait(timeout)
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            self._handle_inbox(inbox)
            if stopping:  # stop() has drained what it could: abort whatever is left, then exit
                with self._cond:
                    left = [("abort", rid) for rid in self._tracks]
                self._handle_inbox(left)
                with self._cond:
                    self._publish_locked()
                return
            timeout = self._admit()
            outs: list[RequestOutput] = []
            if engine.has_unfinished():
                try:
                    outs = engine.step()
                except Exception as e:  # a broken step must not hang every caller
                    self._fail_all(e)
            with self._cond:
                self._publish_locked()
                for out in outs:
                    track = self._tracks.get(out.request_id)
                    if track is None:
                        continue
                    out.arrival_time = track.submit_time  # TTFT/latency include the queueing time
                    self._tokens_generated += len(out.delta_token_ids)
                    if out.finished:
                        self._finish_locked(track, out)
                    self._deliver(track, out)

    def _fail_all(self, exc: Exception) -> None:
        with self._cond:
            self._error = f"{type(exc).__name__}: {exc}"
            tracks = list(self._tracks.values())
        for t in tracks:
            if t.in_engine:
                self.engine.abort(t.request_id)
            with self._cond:
                self._finish_locked(t, None)
            self._deliver(t, RuntimeError(f"the engine failed: {exc}"))
        self._pending.clear()


async def iterate(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """``async for`` over a service stream that always aborts what it leaves unfinished."""
    try:
        async for out in stream:
            yield out
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
