"""`mlsyskit serve --replicas N` / `--autoscale MIN..MAX`: engine worker processes behind the router.

Each replica is a separate `python -m mlsyskit serve` process on a loopback port it picks (its own
engine, KV cache and GIL), started with the same model flags; the CPU threads are split between
replicas (`--threads` total, default one per core, divided by the largest replica count so
replicas never oversubscribe the cores). This process runs the router on `--host:--port`.
With `--replica-spec SPEC...` (one per replica, ``threads=N,kv=TOKENS,ctx=TOKENS``) the replicas
differ: each worker gets its spec's ``--threads``, ``--num-kv-blocks`` (KV tokens / 16) and
``--max-model-len``, and the router's policy is told which replica is which (a small
heterogeneous cluster on one machine).

Cold start (process start -> first healthy /health) is measured and logged per replica: the
engine memory-maps the GGUF and loads it once per process, so a new replica is ready in seconds.

Nothing is restarted silently: a replica that exits is removed from rotation and logged; under
`--autoscale` a replacement is started (and logged). Scale-down drains: the replica leaves
rotation, its in-flight requests finish, then it gets SIGTERM. On SIGINT/SIGTERM the router keeps
listening but answers 503 (and /health 503) while every worker, signalled at once, drains on its
own --drain-timeout: open answers finish or end cleanly (an error event and [DONE]) and the
router relays those ends; then the workers and the router exit, with status 0.

The autoscaler's settings (see `mlsyskit.serve.autoscale`) can be tuned with the environment
variable MLSYSKIT_AUTOSCALE, comma-separated KEY=VALUE among up_threshold (default 2 waiting
requests per replica), down_threshold (0), up_after (2 polls), down_after (5), cooldown (10 s),
latency_up_s, latency_down_s (off) and interval (1 s between polls), e.g.
MLSYSKIT_AUTOSCALE="up_threshold=4,cooldown=30".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mlsyskit.errors import UserError
from mlsyskit.serve.autoscale import Autoscaler, Observation, parse_range
from mlsyskit.serve.listen import bind_socket
from mlsyskit.serve.options import serve_parser
from mlsyskit.serve.router import Router, _queue, build_app

log = logging.getLogger("mlsyskit.replicas")

READY_TIMEOUT_S = 300.0  # a replica that is not healthy by then is stopped and reported
STOP_TIMEOUT_S = 30.0  # SIGTERM -> SIGKILL
ROUTER_DRAIN_MARGIN_S = 5.0  # at shutdown, the router's deadline is the workers' plus this
# serve flags that belong to this process, not to the workers
# (the API key goes to the workers through the environment: a command line is visible in `ps`)
_OWN = {"host", "port", "replicas", "autoscale", "threads", "api_key", "func", "command", "help", "policy", "replica_spec"}
KV_BLOCK_TOKENS = 16  # the engine's block size: a spec's kv tokens -> --num-kv-blocks


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The `serve` flags of `args` that differ from their defaults, as command-line words, minus
    the ones this process owns (host, port, replicas, autoscale, threads)."""
    parser = serve_parser()
    out: list[str] = []
    for a in parser._actions:
        if a.dest in _OWN or not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        if not hasattr(args, a.dest):
            continue
        value = getattr(args, a.dest)
        if value == a.default:
            continue
        opt = next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
        if isinstance(a, argparse.BooleanOptionalAction):
            out.append(opt if value else "--no-" + opt[2:])
        elif isinstance(a, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._StoreConstAction):
            out.append(opt)
        elif isinstance(a, argparse._AppendAction):
            for v in value or []:
                out += [opt, str(v)]
        elif isinstance(value, list | tuple):
            out += [opt, *map(str, value)]
        elif value is not None:
            out += [opt, str(value)]
    return out


def _set_pdeathsig() -> None:
    """Child side: get SIGTERM if the parent dies, so no orphaned replica keeps a port and GBs."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_READY = re.compile(r"^serving \S+ on http://127\.0\.0\.1:(\d+) ")


def _relay(w: Worker) -> None:
    """Copy a worker's output to ours, each line prefixed with its replica. Its own ready line
    ("serving ... on URL") gives the port it bound (it was started with --port 0, so no port is
    ever raced for) and is not repeated: only this process prints a ready line."""
    assert w.proc.stdout is not None
    prefix = f"replica {w.index} | "
    for raw in w.proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        m = _READY.match(line)
        if m and w.port is None:
            w.port = int(m.group(1))
            continue
        with contextlib.suppress(Exception):
            print(prefix + line, file=sys.stderr, flush=True)


@dataclass
class Worker:
    """One replica process."""

    index: int
    proc: subprocess.Popen
    port: int | None = None  # read from its ready line
    started: float = field(default_factory=time.monotonic)
    ready_s: float | None = None  # cold start: process start -> healthy
    stopping: bool = False
    terminated: bool = False  # SIGTERM sent
    spec: Any = None  # its cluster.routing.ReplicaSpec with --replica-spec, else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.port is not None else "(port not known yet)"


class ReplicaManager:
    """Starts, watches, scales and stops the worker processes; feeds the router's pool."""

    def __init__(
        self,
        router: Router,
        flags: list[str],
        threads_per_replica: int,
        replicas: int,
        autoscaler: Autoscaler | None = None,
        poll_interval: float = 1.0,
        ready_timeout: float = READY_TIMEOUT_S,
        specs: list[Any] | None = None,
    ) -> None:
        self.router = router
        self.specs = list(specs or [])  # ReplicaSpec per initial replica (--replica-spec)
        self.flags = flags
        self.per_replica_threads = threads_per_replica
        self.initial = replicas
        self.autoscaler = autoscaler
        self.poll_interval = poll_interval
        self.ready_timeout = ready_timeout
        self.workers: dict[int, Worker] = {}
        self.cold_starts: list[float] = []
        self.events: dict[str, int] = {"up": 0, "down": 0, "died": 0, "replaced": 0, "failed_start": 0}
        self._next = 0
        self._busy = False  # one scaling action at a time
        self._task: asyncio.Task | None = None
        self._closing = False

    def command(self, spec: Any = None) -> list[str]:
        """A worker's command line; a spec's threads, KV budget and context come last (they win)."""
        cmd = [sys.executable, "-m", "mlsyskit", "serve", *self.flags, "--host", "127.0.0.1", "--port", "0", "--threads", str(self.threads(spec)), "--replicas", "1"]
        if spec is not None:
            from mlsyskit.cluster.routing import UNBOUNDED

            if spec.kv_tokens != UNBOUNDED:
                cmd += ["--num-kv-blocks", str(max(1, spec.kv_tokens // KV_BLOCK_TOKENS))]
            if spec.max_model_len != UNBOUNDED:
                cmd += ["--max-model-len", str(spec.max_model_len)]
        return cmd

    def threads(self, spec: Any = None) -> int:
        return self.per_replica_threads if spec is None else max(1, round(spec.threads))

    def ready(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.ready_s is not None and not w.stopping]

    async def start_worker(self, spec: Any = None) -> Worker | None:
        """Start one replica (unequal: with its ``spec``), wait until it is healthy, put it in
        rotation (telling the policy its spec); None if it failed."""
        import httpx

        self._next += 1
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads(spec)))
        env.pop("MLSYSKIT_API_KEY", None)
        if self.router.api_key:
            env["MLSYSKIT_API_KEY"] = self.router.api_key
        proc = subprocess.Popen(self.command(spec), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_set_pdeathsig)  # noqa: PLW1509
        w = Worker(self._next, proc, spec=spec)
        threading.Thread(target=_relay, args=(w,), daemon=True).start()
        self.workers[w.index] = w
        deadline = w.started + self.ready_timeout
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    log.error("replica %d (%s) exited with code %s while starting", w.index, w.url, proc.returncode)
                    break
                if time.monotonic() > deadline:
                    log.error("replica %d (%s) not healthy after %.0f s: stopping it", w.index, w.url, self.ready_timeout)
                    await self._terminate(w)
                    break
                if self._closing:
                    await self._terminate(w)
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if w.port is not None and (await client.get(w.url + "/health", headers=self.router._auth())).status_code == 200:
                        w.ready_s = time.monotonic() - w.started
                        self.cold_starts.append(w.ready_s)
                        if spec is not None and self.router.policy is not None:
                            self.router.policy.specs[w.url] = spec
                        self.router.add_backend(w.url)
                        log.warning("replica %d ready on %s (pid %d): cold start %.2f s", w.index, w.url, proc.pid, w.ready_s)
                        return w
                await asyncio.sleep(0.1)
        self.workers.pop(w.index, None)
        self.events["failed_start"] += 1
        return None

    async def _terminate(self, w: Worker) -> None:
        """SIGTERM (the worker finishes or aborts its requests and exits), SIGKILL after a timeout."""
        if w.proc.poll() is None:
            self._sigterm(w)
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.run_in_executor(None, w.proc.wait), STOP_TIMEOUT_S)
            except TimeoutError:
                log.error("replica %d did not stop within %.0f s: SIGKILL", w.index, STOP_TIMEOUT_S)
                w.proc.kill()
                await loop.run_in_executor(None, w.proc.wait)

    @staticmethod
    def _sigterm(w: Worker) -> None:
        if not w.terminated and w.proc.poll() is None:
            w.terminated = True
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)

    def begin_stop(self) -> None:
        """Shutdown starts: no more scaling or replacing, and every worker gets SIGTERM now, so
        each drains on its own clock (its --drain-timeout) while the router relays the ends of
        the answers in flight: finished, or an error event and [DONE] at the deadline."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        for w in list(self.workers.values()):
            w.stopping = True
            self._sigterm(w)

    async def stop_worker(self, w: Worker, drain: bool = True) -> None:
        """Drain (leave rotation, wait for in-flight requests), then terminate."""
        w.stopping = True
        if drain:
            done = await self.router.drain(w.url)
            if not done:
                log.error("replica %d still had requests after the drain timeout", w.index)
        self.router.remove_backend(w.url)
        await self._terminate(w)
        self.workers.pop(w.index, None)

    async def start(self) -> None:
        """Start the initial replicas (in parallel) and the watch/scale loop."""
        specs = self.specs or [None] * self.initial
        results = await asyncio.gather(*(self.start_worker(spec) for spec in specs))
        if not any(results):
            raise UserError("no replica could be started; see the errors above")
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop every worker (the router has already stopped accepting and let requests finish)."""
        self.begin_stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self.stop_worker(w, drain=True) for w in list(self.workers.values())))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._watch()
                if self.autoscaler is not None and not self._busy:
                    await self._scale()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad poll
                log.exception("replica loop")

    async def _watch(self) -> None:
        for w in list(self.workers.values()):
            if w.ready_s is None or w.stopping or w.proc.poll() is None:
                continue
            self.workers.pop(w.index, None)
            self.router.remove_backend(w.url)
            self.events["died"] += 1
            log.error("replica %d (%s, pid %d) exited with code %s: removed from rotation", w.index, w.url, w.proc.pid, w.proc.returncode)
            if self.autoscaler is not None:
                self.events["replaced"] += 1
                log.warning("autoscale: starting a replacement for replica %d", w.index)
                self._spawn(self._up())

    def _spawn(self, coro: Any) -> None:
        self._busy = True

        async def run() -> None:
            try:
                await coro
            finally:
                self._busy = False

        asyncio.create_task(run())

    def observe(self) -> Observation:
        ready = self.ready()
        urls = {w.url for w in ready}
        queue = sum(_queue(b) for b in self.router.backends.values() if b.url in urls and b.routable)
        return Observation(time.monotonic(), len(ready), float(queue), self.router.latency_quantile(0.9))

    async def _scale(self) -> None:
        obs = self.observe()
        step = self.autoscaler.decide(obs)
        if step > 0:
            log.warning("autoscale: %d -> %d replicas (%s)", obs.replicas, obs.replicas + 1, self.autoscaler.reason)
            self._spawn(self._up())
        elif step < 0:
            log.warning("autoscale: %d -> %d replicas (%s)", obs.replicas, obs.replicas - 1, self.autoscaler.reason)
            self._spawn(self._down())

    async def _up(self) -> None:
        w = await self.start_worker()
        if w is None:
            self.autoscaler.cancel()
        else:
            self.events["up"] += 1

    async def _down(self) -> None:
        ready = self.ready()
        if len(ready) <= 1:
            return
        # the least busy replica drains fastest
        w = min(ready, key=lambda w: (self.router.backends[w.url].in_flight if w.url in self.router.backends else 0, -w.index))
        await self.stop_worker(w, drain=True)
        self.events["down"] += 1
        log.warning("autoscale: replica %d drained and stopped", w.index)

    def metrics(self) -> str:
        lines = [
            "# HELP mlsyskit_replicas Replica processes by state.",
            "# TYPE mlsyskit_replicas gauge",
            f'mlsyskit_replicas{{state="ready"}} {len(self.ready())}',
            f'mlsyskit_replicas{{state="starting"}} {sum(1 for w in self.workers.values() if w.ready_s is None)}',
            f'mlsyskit_replicas{{state="stopping"}} {sum(1 for w in self.workers.values() if w.stopping)}',
            "# HELP mlsyskit_replica_cold_start_seconds Process start to first healthy /health, per replica.",
            "# TYPE mlsyskit_replica_cold_start_seconds gauge",
        ]
        for w in self.workers.values():
            if w.ready_s is not None:
                lines.append(f'mlsyskit_replica_cold_start_seconds{{replica="{w.index}",url="{w.url}"}} {w.ready_s:.3f}')
        lines += ["# HELP mlsyskit_replica_events_total Replica lifecycle events.", "# TYPE mlsyskit_replica_events_total counter"]
        for k, v in self.events.items():
            lines.append(f'mlsyskit_replica_events_total{{event="{k}"}} {v}')
        return "\n".join(lines) + "\n"


AUTOSCALE_ENV = "MLSYSKIT_AUTOSCALE"
_AUTOSCALE_KEYS = {"up_threshold": float, "down_threshold": float, "up_after": int, "down_after": int, "cooldown": float, "latency_up_s": float, "latency_down_s": float, "interval": float}


def autoscale_settings(text: str | None) -> dict[str, float | int]:
    """Parse MLSYSKIT_AUTOSCALE ("key=value,..."); UserError on an unknown key or bad value."""
    out: dict[str, float | int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _AUTOSCALE_KEYS:
            raise UserError(f"{AUTOSCALE_ENV}: expected KEY=VALUE with KEY among {', '.join(_AUTOSCALE_KEYS)}; got {item.strip()!r}")
        try:
            out[key] = _AUTOSCALE_KEYS[key](value.strip())
        except ValueError:
            raise UserError(f"{AUTOSCALE_ENV}: {key} needs a number, got {value.strip()!r}") from None
    if out.get("interval", 1.0) <= 0:
        raise UserError(f"{AUTOSCALE_ENV}: interval must be positive")
    return out


def serve_replicated(args: argparse.Namespace) -> int:
    """Run `--replicas N` or `--autoscale MIN..MAX` workers behind the router on args.host:args.port
    until SIGINT/SIGTERM; 0 after a graceful stop, 1 if no replica could start."""
    import uvicorn

    from mlsyskit.serve.graceful import GracefulServer

    autoscale = getattr(args, "autoscale", None)
    replicas = getattr(args, "replicas", None) or 1
    scaler = None
    interval = 1.0
    if autoscale:
        lo, hi = autoscale if isinstance(autoscale, tuple | list) else parse_range(autoscale)
        settings = autoscale_settings(os.environ.get(AUTOSCALE_ENV))
        interval = float(settings.pop("interval", 1.0))
        scaler = Autoscaler(lo, hi, **settings)
        initial, most = max(lo, min(hi, replicas if getattr(args, "replicas", None) else lo)), hi
    else:
        if replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {replicas}")
        initial = most = replicas
    total = getattr(args, "threads", None) or os.cpu_count() or 1
    if total < 1:
        raise UserError(f"--threads must be at least 1, got {total}")
    per = max(1, total // most)
    flags = worker_flags(args)
    from mlsyskit.cluster.routing import RoutingPolicy, build_routing_policy, parse_replica_spec

    spec_texts = getattr(args, "replica_spec", None) or []
    if spec_texts and (scaler is not None or len(spec_texts) != initial):
        raise UserError(f"--replica-spec: give one per replica with --replicas N (N={initial}, got {len(spec_texts)}), not with --autoscale")
    specs = [parse_replica_spec(t) for t in spec_texts]

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    host, port = getattr(args, "host", "127.0.0.1"), int(getattr(args, "port", 8000))
    sock = bind_socket(host, port)  # a busy port is one clear error before any worker starts
    sock.set_inheritable(False)  # the workers must not hold the router's port
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    api_key = getattr(args, "api_key", None) or os.environ.get("MLSYSKIT_API_KEY") or None
    policy = build_routing_policy(getattr(args, "policy", None), [], None)
    if specs and policy is None:  # unequal replicas: a policy that reads their specs
        policy = RoutingPolicy("lot")
    routing = f"policy {policy.name}" if policy else "least outstanding tokens"
    router = Router([], api_key=api_key, policy=policy)
    manager = ReplicaManager(router, flags, per, initial, scaler, poll_interval=interval, specs=specs)
    router.extra_metrics = manager.metrics
    failed: list[str] = []
    mode = f"autoscale {scaler.min}..{scaler.max}" if scaler else f"replicas={initial}"

    async def start() -> None:
        try:
            await manager.start()
        except UserError as e:  # one line, not uvicorn's startup traceback
            failed.append(str(e))
            server.should_exit = True
            return
        name = await _model_name(router)
        cs = ", ".join(f"{c:.1f}s" for c in manager.cold_starts)
        # the same ready line as a single `mlsyskit serve`, so scripts can wait for it
        each = f"threads {'/'.join(str(manager.threads(x)) for x in specs)}" if specs else f"{per} thread(s) each"
        print(f"serving {name} on http://{shown}:{bound_port} ({mode}, {each}, router: {routing}, cold starts {cs})", flush=True)

    app = build_app(router, lifespan_hooks=(start, manager.close))
    log.warning("starting %s (%d thread(s) each) behind the router on http://%s:%d", mode, per, shown, bound_port)

    def drain() -> None:
        router.begin_drain()
        manager.begin_stop()

    # The workers end their own answers at --drain-timeout (cleanly, with [DONE]); the router
    # cuts what is still open a little later, should a worker not manage to.
    drain_timeout = float(getattr(args, "drain_timeout", 30.0)) + ROUTER_DRAIN_MARGIN_S
    server = GracefulServer(
        uvicorn.Config(app, log_level="warning"),
        drain_timeout=drain_timeout, drain=drain, idle=lambda: router.in_flight == 0, abort=router.abort_all,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise UserError(failed[0])
    if not server.started:
        return 1
    if manager.cold_starts:
        cs_all = manager.cold_starts
        log.warning("stopped; cold starts %s s (mean %.2f s)", ", ".join(f"{c:.2f}" for c in cs_all), sum(cs_all) / len(cs_all))
    print("server stopped", file=sys.stderr, flush=True)
    return 0


async def _model_name(router: Router) -> str:
    """The model id the first live replica serves (for the ready line)."""
    for b in router.live():
        with contextlib.suppress(Exception):
            r = await router._client.get(b.url + "/v1/models", headers=router._auth(), timeout=5.0)
            return str(r.json()["data"][0]["id"])
    return "model"
