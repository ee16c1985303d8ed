"""`mlsyskit router` and `mlsyskit loadgen`.

Nothing heavy is imported at module level: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the router and load-generator subcommands to the top-level parser."""
    r = sub.add_parser(
        "router",
        help="load-balancing router (least outstanding tokens, retries, health checks) in front of serve replicas",
        description="Forward /v1/* and /rag requests (JSON and streamed) to the live backend with the least "
        "outstanding tokens; retry on another backend when one fails before answering; take dead backends out "
        "of rotation and put recovered ones back. GET /health and GET /metrics report the router's own state.",
    )
    r.add_argument("--backends", nargs="+", required=True, metavar="URL", help="base URLs of `mlsyskit serve` processes, e.g. http://127.0.0.1:8001")
    r.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    r.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    r.add_argument("--health-interval", type=float, default=1.0, metavar="S", help="seconds between health checks of each backend (default: 1.0)")
    r.add_argument("--timeout", type=float, default=600.0, metavar="S", help="longest a backend may take to answer one request (default: 600)")
    r.add_argument("--api-key", default=None, metavar="KEY", help="key the router uses for its own health checks when backends require one; clients' Authorization headers are passed through (default: none)")
    r.add_argument("--drain-timeout", type=float, default=30.0, metavar="S", help="on SIGTERM/SIGINT, seconds the requests in flight get to finish (new ones get 503) before they are ended with an error (default: 30)")
    r.add_argument("--policy", default=None, metavar="NAME", help="placement policy of mlsyskit.cluster (the simulator's code): random, round-robin, jsq, lot, length-class, best-fit, oracle, predict (default: least outstanding tokens)")
    r.add_argument("--replica-spec", nargs="+", default=None, metavar="SPEC", help="one per backend, in --backends order: threads=N,kv=TOKENS,ctx=TOKENS (its speed, KV budget and context) for the policies that weigh them (default: equal replicas, unbounded)")
    r.set_defaults(func=_router)

    g = sub.add_parser(
        "loadgen",
        help="open-loop load generator (Poisson or constant arrivals) for a local serve or router",
        description="Send requests at RATE req/s for DURATION s with Poisson or constant arrivals (open loop: "
        "the schedule does not wait for the server) to a loopback server, then report throughput, TTFT and "
        "end-to-end latency p50/p90/p99 and errors by HTTP status (429s counted separately). Latencies count "
        "from each request's scheduled arrival.",
    )
    g.add_argument("--url", required=True, help="base URL of the server, loopback only (e.g. http://127.0.0.1:8000)")
    g.add_argument("--rate", type=float, required=True, metavar="R", help="offered requests per second")
    g.add_argument("--duration", type=float, required=True, metavar="S", help="seconds of arrivals; the run then waits at most --timeout for the last answers")
    g.add_argument("--arrival", default="poisson", choices=("poisson", "constant"), help="arrival process (default: poisson)")
    g.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line, or JSONL with a \"prompt\" field (default: 16 short embedded questions)")
    g.add_argument("--endpoint", default="chat", choices=("chat", "completions", "rag"), help="chat = /v1/chat/completions, completions = /v1/completions, rag = /rag with {query, k} (default: chat)")
    g.add_argument("--max-tokens", type=int, default=32, metavar="N", help="max_tokens of each request (default: 32)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="stream the answers (needed for TTFT) (default: --stream)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature of each request (default: 0, greedy)")
    g.add_argument("--model", default=None, help="model name to put in requests (default: the first model the server lists at /v1/models)")
    g.add_argument("--seed", type=int, default=0, help="seed of the arrival times and prompt choice (default: 0)")
    g.add_argument("--max-in-flight", type=int, default=256, metavar="N", help="most open requests; arrivals beyond it are counted as skipped, never delayed (default: 256)")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per-request timeout (default: 60)")
    g.add_argument("--api-key", default=None, metavar="KEY", help="Bearer key for the server (default: none)")
    g.add_argument("--out", default=None, metavar="JSON", help="also write the report to this JSON file (default: off)")
    g.add_argument("--max-error-rate", type=float, default=0.1, metavar="F", help="exit 1 when the error rate (failed or skipped arrivals, 429s and timeouts included, over all arrivals) is above F, so scripts and CI can rely on the exit status; 1 never fails (default: 0.1)")
    g.set_defaults(func=_loadgen)


def _router(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from mlsyskit.errors import UserError
    from mlsyskit.serve.router import run_router

    for url in args.backends:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--backends takes base URLs like http://127.0.0.1:8001, got {url!r}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.health_interval <= 0 or args.timeout <= 0:
        raise UserError("--health-interval and --timeout must be positive")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from mlsyskit.cluster.routing import build_routing_policy

    policy = build_routing_policy(args.policy, args.backends, args.replica_spec)
    shown = f"policy {policy.name}" if policy else "least outstanding tokens"
    print(f"router on http://{args.host}:{args.port} over {len(args.backends)} backend(s), {shown}", flush=True)
    return run_router(args.backends, args.host, args.port, health_interval=args.health_interval, request_timeout=args.timeout, api_key=args.api_key, drain_timeout=args.drain_timeout, policy=policy)


def _loadgen(args: argparse.Namespace) -> int:
    from mlsyskit.errors import UserError
    from mlsyskit.serve.loadgen import check_loopback, format_report, load_prompts, run_load

    check_loopback(args.url)  # before anything else: refuse at once
    if not 0 <= args.max_error_rate <= 1:
        raise UserError(f"--max-error-rate is a fraction in 0..1 (0.1 = 10%), got {args.max_error_rate}")
    prompts = load_prompts(args.prompts)
    report = run_load(
        args.url, args.rate, args.duration, arrival=args.arrival, prompts=prompts, endpoint=args.endpoint,
        max_tokens=args.max_tokens, stream=args.stream, seed=args.seed, max_in_flight=args.max_in_flight,
        timeout=args.timeout, model=args.model, temperature=args.temperature, api_key=args.api_key,
    )
    print(format_report(report))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}")
    rate = report["error_rate"]
    if rate > args.max_error_rate:
        arrivals = report["sent"] + report["skipped_max_in_flight"]
        print(f"mlsyskit loadgen: error rate {rate:.1%} ({arrivals - report['ok']} of {arrivals} arrivals not answered) "
              f"is above --max-error-rate {args.max_error_rate:.1%}", file=sys.stderr, flush=True)
        return 1
    return 0
