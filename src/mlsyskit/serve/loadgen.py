"""Open-loop load generator for the OpenAI-compatible server (`mlsyskit loadgen`).

Requests arrive on a fixed schedule (Poisson or constant gaps) whatever the server does: a slow
server does not slow the arrivals down (open loop), so queueing shows up in the latencies
instead of being hidden. Latencies count from each request's *scheduled* arrival, so a late
send (the client's own event loop lagging) is charged to the measurement, not dropped.

Bounded in requests (rate x duration) and in time (duration + timeout), and loopback only: a
load generator must not be pointed at someone else's machine by accident.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mlsyskit.errors import UserError

# Short real questions: the default prompt list when no --prompts file is given.
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence what a hash table is.",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "What does a CPU cache do?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Translate 'good morning' into French.",
    "What is 12 times 7?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What is the boiling point of water at sea level?",
    "List two uses of a paperclip.",
    "Who wrote 'Hamlet'?",
    "What is a prime number?",
    "Suggest a name for a pet turtle.",
]

ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "rag": "/rag",
}


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; UserError unless it is http(s) on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise UserError(
            f"loadgen only targets loopback addresses (127.0.0.1, ::1, localhost); refusing host {host!r}"
        )
    return url.rstrip("/")


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file (one per line, or JSONL objects with a "prompt" field), else the
    embedded list. Blank lines are skipped."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {p}: {e}") from e
    prompts: list[str] = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: invalid JSON line ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f"{p}:{i}: a JSON line needs a string \"prompt\" field")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"prompts file {p} holds no prompt")
    return prompts


def arrival_times(rate: float, duration: float, arrival: str, seed: int, max_requests: int | None = None) -> np.ndarray:
    """Send times in [0, duration): exponential gaps (Poisson) or 1/rate gaps (constant)."""
    if rate <= 0:
        raise UserError(f"--rate must be positive, got {rate}")
    if duration <= 0:
        raise UserError(f"--duration must be positive, got {duration}")
    if arrival not in ("poisson", "constant"):
        raise UserError(f"--arrival must be poisson or constant, got {arrival!r}")
    cap = max_requests if max_requests is not None else int(math.ceil(rate * duration)) * 4 + 16
    if arrival == "constant":
        times = np.arange(0.0, duration, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        times = np.cumsum(rng.exponential(1.0 / rate, size=cap))
        times = np.concatenate([[0.0], times[:-1]])
        times = times[times < duration]
    return times[:cap]


def _body(endpoint: str, prompt: str, model: str | None, max_tokens: int, stream: bool, temperature: float, seed: int | None) -> dict[str, Any]:
    if endpoint == "rag":
        return {"query": prompt, "k": 2}
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "stream": stream}
    if model:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}  # the last chunk carries token counts
    return body


def _text_of(obj: dict[str, Any], endpoint: str) -> str:
    """The generated text of a full (non-streamed) response or of one SSE chunk."""
    choices = obj.get("choices")
    if choices:
        c = choices[0]
        if "delta" in c:
            return c["delta"].get("content") or ""
        if "message" in c:
            return c["message"].get("content") or ""
        return c.get("text") or ""
    for key in ("answer", "text", "completion"):  # the course's /rag body
        if isinstance(obj.get(key), str):
            return obj[key]
    return ""


async def _one(client: Any, url: str, body: dict[str, Any], stream: bool, endpoint: str, t_sched: float, t0: float, timeout: float, headers: dict[str, str]) -> dict[str, Any]:
    """Send one request; a record {status, ttft, latency, tokens, text, error}."""
    import httpx

    rec: dict[str, Any] = {"status": None, "ttft": None, "latency": None, "tokens": 0, "text": "", "error": None}
    start = t0 + t_sched  # latency counts from the scheduled arrival

    async def go() -> None:
        if not stream:
            r = await client.post(url, json=body, headers=headers)
            rec["status"] = r.status_code
            if r.status_code == 200:
                obj = r.json()
                rec["text"] = _text_of(obj, endpoint)
                usage = obj.get("usage") or {}
                rec["tokens"] = int(usage.get("completion_tokens") or 0)
                rec["ttft"] = None
            rec["latency"] = time.perf_counter() - start
            return
        async with client.stream("POST", url, json=body, headers=headers) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                rec["latency"] = time.perf_counter() - start
                return
            chunks, usage_tokens, done = 0, None, False
            parts: list[str] = []
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = "stream_error"
                    break
                piece = _text_of(obj, endpoint)
                if piece:
                    if rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - start
                    chunks += 1
                    parts.append(piece)
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
            rec["latency"] = time.perf_counter() - start
            rec["text"] = "".join(parts)
            # A server that does not send usage: one streamed chunk is one token.
            rec["tokens"] = int(usage_tokens) if usage_tokens is not None else chunks
            if not done and rec["error"] is None:
                rec["error"] = "stream_cut"  # the stream ended without data: [DONE]

    try:
        await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        rec["error"] = "timeout"
    except httpx.HTTPError as e:
        rec["error"] = "connection" if isinstance(e, httpx.TransportError) else type(e).__name__
    except (json.JSONDecodeError, ValueError):
        rec["error"] = "bad_response"
    return rec


async def _server_model(client: Any, base: str, headers: dict[str, str]) -> str | None:
    """The first model id the server lists (requests must name one, as with OpenAI)."""
    import httpx

    try:
        r = await client.get(base + "/v1/models", headers=headers)
        if r.status_code == 200:
            data = r.json().get("data") or []
            if data and isinstance(data[0].get("id"), str):
                return data[0]["id"]
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return None  # the requests will show the server's own error


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


def summarize(records: list[dict[str, Any]], offered_rate: float, wall: float, skipped: int) -> dict[str, Any]:
    """Throughput, latency percentiles and error counts of a list of request records."""
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    statuses = Counter(str(r["status"]) for r in records if r["status"] is not None and r["status"] != 200)
    other = Counter(r["error"] for r in records if r["error"] is not None)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    sent = len(records)
    failed = sent - len(ok)
    return {
        "offered_rate": round(offered_rate, 4),
        "sent": sent,
        "ok": len(ok),
        "failed": failed,
        "rate_limited_429": statuses.get("429", 0),
        "errors_by_status": dict(sorted(statuses.items())),
        "timeouts": other.get("timeout", 0),
        "errors_other": {k: v for k, v in sorted(other.items()) if k != "timeout"},
        "skipped_max_in_flight": skipped,
        "error_rate": round((failed + skipped) / (sent + skipped), 4) if sent + skipped else 0.0,
        "wall_s": round(wall, 3),
        "throughput_req_s": round(len(ok) / wall, 4) if wall > 0 else None,
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "output_tokens": tokens,
        "latency_p50_s": _pct(lat, 50),
        "latency_p90_s": _pct(lat, 90),
        "latency_p99_s": _pct(lat, 99),
        "latency_mean_s": round(float(np.mean(lat)), 4) if lat else None,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
    }


async def run_load_async(
    url: str,
    rate: float,
    duration: float,
    *,
    arrival: str = "poisson",
    prompts: list[str] | None = None,
    endpoint: str = "chat",
    max_tokens: int = 32,
    stream: bool = True,
    seed: int = 0,
    max_in_flight: int = 256,
    timeout: float = 60.0,
    model: str | None = None,
    temperature: float = 0.0,
    api_key: str | None = None,
    max_requests: int | None = None,
    keep_records: bool = False,
) -> dict[str, Any]:
    """`run_load` inside a running event loop."""
    import httpx

    base = check_loopback(url)
    if endpoint not in ENDPOINTS:
        raise UserError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if max_in_flight < 1:
        raise UserError(f"--max-in-flight must be at least 1, got {max_in_flight}")
    if timeout <= 0:
        raise UserError(f"--timeout must be positive, got {timeout}")
    prompts = prompts or list(DEFAULT_PROMPTS)
    times = arrival_times(rate, duration, arrival, seed, max_requests)
    target = base + ENDPOINTS[endpoint]
    stream = stream and endpoint != "rag"  # the course's /rag answers in one JSON body
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = np.random.default_rng(seed + 1)
    order = rng.integers(0, len(prompts), size=len(times))

    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    records: list[dict[str, Any]] = []
    skipped = 0
    tasks: list[asyncio.Task] = []
    in_flight = 0

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), limits=limits, trust_env=False) as client:
        if model is None and endpoint != "rag":
            model = await _server_model(client, base, headers)

        async def fire(i: int, t_sched: float, t0: float) -> None:
            nonlocal in_flight
            try:
                body = _body(endpoint, prompts[order[i]], model, max_tokens, stream, temperature, None)
                rec = await _one(client, target, body, stream, endpoint, t_sched, t0, timeout, headers)
                rec["arrival"] = t_sched
                rec["prompt"] = prompts[order[i]]
                records.append(rec)
            finally:
                in_flight -= 1

        t0 = time.perf_counter()
        for i, t in enumerate(times):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                skipped += 1  # open loop: never wait for a slot, count the arrival as lost
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(fire(i, float(t), t0)))
        if tasks:
            # Each request is bounded by its own timeout; this is a backstop only.
            await asyncio.wait(tasks, timeout=timeout + 5.0)
        for task in tasks:
            task.cancel()
        wall = max([r["arrival"] + r["latency"] for r in records if r["latency"] is not None], default=0.0)
        wall = max(wall, float(times[-1]) if len(times) else 0.0, 1e-9)

    offered = rate
    report = summarize(records, offered, wall, skipped)
    report.update({
        "url": target, "arrival": arrival, "duration_s": duration, "endpoint": endpoint,
        "max_tokens": max_tokens, "stream": stream, "seed": seed, "scheduled": int(len(times)),
    })
    if keep_records:
        report["records"] = sorted(records, key=lambda r: r["arrival"])
    return report


def run_load(url: str, rate: float, duration: float, **kwargs: Any) -> dict[str, Any]:
    """Drive URL with open-loop arrivals at `rate` req/s for `duration` s; the summary dict
    (see `summarize`; keep_records=True adds every request's record)."""
    return asyncio.run(run_load_async(url, rate, duration, **kwargs))


def format_report(r: dict[str, Any]) -> str:
    """A small human-readable table of a `run_load` summary."""

    def f(x: Any, unit: str = "") -> str:
        return "-" if x is None else (f"{x:.3f}{unit}" if isinstance(x, float) else f"{x}{unit}")

    rows = [
        ("target", r.get("url", "")),
        ("offered rate", f(r["offered_rate"], " req/s") + f"  ({r.get('arrival', '')}, {r.get('scheduled', r['sent'])} scheduled)"),
        ("sent / ok / failed", f"{r['sent']} / {r['ok']} / {r['failed']}"),
        ("throughput", f(r["throughput_req_s"], " req/s") + ", " + f(r["output_tok_s"], " output tok/s")),
        ("latency p50/p90/p99", " / ".join(f(r[f"latency_p{q}_s"], " s") for q in (50, 90, 99))),
        ("TTFT p50/p90/p99", " / ".join(f(r[f"ttft_p{q}_s"], " s") for q in (50, 90, 99))),
        ("429 rate limited", str(r["rate_limited_429"])),
        ("errors by status", json.dumps(r["errors_by_status"]) if r["errors_by_status"] else "none"),
        ("timeouts", str(r["timeouts"])),
        ("other errors", json.dumps(r["errors_other"]) if r["errors_other"] else "none"),
        ("skipped (max in flight)", str(r["skipped_max_in_flight"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
