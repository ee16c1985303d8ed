"""Graceful shutdown for every HTTP process of `mlsyskit serve` and `mlsyskit router`.

uvicorn's own shutdown closes the listening socket first, then waits for open connections and,
past ``timeout_graceful_shutdown``, cancels the handlers mid-response (a cut stream, a
``CancelledError`` traceback). :class:`GracefulServer` drains *before* that, with the socket still
open:

1. ``drain()``: the app stops accepting work; new requests get a real 503 and ``/health``
   answers 503 (``"status": "draining"``), so load balancers and clients can see the drain;
2. in-flight requests get ``drain_timeout`` seconds to finish (``idle()`` says when none is left);
3. ``abort()``: whatever is left is aborted, and each response still ends cleanly (an error event
   and ``data: [DONE]`` for a stream, a 503 JSON error otherwise);
4. uvicorn's shutdown: the socket closes, connections close, the lifespan ends.

A second Ctrl-C (SIGINT) skips the rest of the wait. The process exits 0 after a graceful stop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

# After the drain, responses end within moments; uvicorn's own deadline is only a backstop.
BACKSTOP_S = 10.0


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains with its listener open (see the module docstring).

    ``drain``, ``idle`` and ``abort`` are the app's hooks (all called on the event loop);
    ``on_ready`` is called once the server accepts connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_timeout: float,
        drain: Callable[[], None] = lambda: None,
        idle: Callable[[], bool] = lambda: True,
        abort: Callable[[], None] = lambda: None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        config.timeout_graceful_shutdown = BACKSTOP_S
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._drain, self._idle, self._abort = drain, idle, abort
        self._on_ready = on_ready
        self.drained_in: float | None = None  # seconds the drain took (None: not drained yet)
        self.aborted = False  # whether requests were still in flight at the deadline

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit and self._on_ready is not None:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.started:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            self._drain()
            while not self._idle() and not self.force_exit and loop.time() - t0 < self.drain_timeout:
                await asyncio.sleep(0.05)
            if not self._idle():
                self.aborted = True
                self._abort()
                # let the aborted responses write their last event before the sockets close
                while not self._idle() and loop.time() - t0 < self.drain_timeout + BACKSTOP_S / 2:
                    await asyncio.sleep(0.02)
            self.drained_in = loop.time() - t0
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutting down, which would make the exit status
        # 128+N; the shutdown was graceful, so exit 0 instead.
        self._captured_signals.clear()
