"""`mlsyskit serve`: the OpenAI-compatible server on uvicorn.

Nothing heavy is imported at module level: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError
from mlsyskit.serve.listen import bind_socket
from mlsyskit.serve.options import add_serve_flags


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
    add_serve_flags(p)
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
    if args.no_rag and args.docs is not None:
        raise UserError(f"--no-rag serves no RAG routes, so --docs {args.docs} would never be read; drop one of them")


def build_service(args: argparse.Namespace) -> tuple[Any, float]:
    """Load the model and build the :class:`EngineService` from the flags; returns it and the
    load time in seconds (the cold start)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from mlsyskit.engine import LLMEngine, load_checkpoint
    from mlsyskit.engine.cli import kv_tier_kwargs, speculative_kwargs
    from mlsyskit.serve.service import EngineService

    ckpt = load_checkpoint(args.model)
    engine = LLMEngine(
        ckpt,
        max_num_seqs=args.max_num_seqs,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        quantization=args.quantization,
        **kv_tier_kwargs(args),
        **speculative_kwargs(args),
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

    Shutdown is graceful (:class:`mlsyskit.serve.graceful.GracefulServer`): the socket stays
    open while ``service`` (an EngineService) drains, so new requests get 503 and /health answers
    503; in-flight requests get ``drain_timeout`` seconds to finish, then the rest are aborted so
    that their responses still end cleanly (an error event and ``[DONE]`` for a stream, a 503
    JSON error otherwise); then the socket and the connections close.
    """
    import uvicorn

    from mlsyskit.serve.graceful import GracefulServer

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"), lifespan="on")
    hooks: dict[str, Any] = {}
    if service is not None:
        hooks = {"drain": service.drain, "idle": lambda: service.in_flight == 0, "abort": service.abort_all}
    server = GracefulServer(config, drain_timeout=drain_timeout, on_ready=on_ready, **hooks)
    server.run(sockets=[sock])
    if not server.started:
        raise UserError("the server failed to start (see the log above)")


def _serve(args: argparse.Namespace) -> int:
    _check_flags(args)  # replicated or not: the workers would refuse the same flags, one by one
    if args.replicas != 1 or args.autoscale:
        if args.replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {args.replicas}")
        from mlsyskit.serve.replicas import serve_replicated

        return serve_replicated(args)
    t_start = time.perf_counter()
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
        service.engine.close()  # --kv-offload disk: the pool's cached blocks and queued writes reach disk
    finally:
        sock.close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0
