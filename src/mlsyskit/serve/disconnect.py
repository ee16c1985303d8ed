"""Cancel a request's handler when its client goes away (ASGI middleware, server and router).

uvicorn does not cancel a handler whose client disconnected: a non-streamed generation would run
to its last token (holding its KV blocks) for nobody, and the official ``openai`` client retries
on timeout, so every timeout would start one more full generation. Streams notice when their
next write fails; a plain request writes nothing until it is done.

:class:`CancelOnDisconnect` watches the connection once the request body has been read and
cancels the handler as soon as the client disconnects before its response is complete. The
cancellation reaches whatever the handler awaits: the engine service's stream aborts its request
(freeing its KV blocks), the router's upstream request is closed (so the replica aborts too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DISCONNECT: Message = {"type": "http.disconnect"}


class CancelOnDisconnect:
    """Pure ASGI middleware: a client that disconnects before its response is complete cancels
    the request's handler.

    After the request body is read, one task owns the connection's ``receive`` channel; the
    app's later ``receive()`` calls (Starlette's own disconnect listeners) wait for that task to
    see the disconnect, so no message is lost between two readers.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = anyio.Event()
        body_read = False
        complete = False
        error: Exception | None = None

        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                if not complete:
                    tg.cancel_scope.cancel()

            async def receive_body() -> Message:
                nonlocal body_read
                if body_read:  # the watcher owns the channel now
                    await gone.wait()
                    return DISCONNECT
                message = await receive()
                if message["type"] == "http.disconnect":
                    body_read = True
                    gone.set()
                elif not message.get("more_body", False):
                    body_read = True
                    tg.start_soon(watch)
                return message

            async def send_tracked(message: Message) -> None:
                nonlocal complete
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    complete = True
                await send(message)

            try:
                await self.app(scope, receive_body, send_tracked)
            except Exception as e:  # raised as is below, not wrapped in the task group's ExceptionGroup
                error = e
            finally:
                tg.cancel_scope.cancel()  # the response is done: stop watching
        if error is not None:
            raise error
