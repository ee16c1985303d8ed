"""The gRPC transport of the FL round loop: client processes on other machines (or this one).

`GrpcTransport` plugs into `mlsyskit.fl.simulation`'s round loop in place of the in-process
simulation: the loop samples, the transport publishes the global model to the sampled clients
(who long-poll ``GetTask``), collects their models (``Submit``) until all answered or the
round's deadline, and the loop rejects, aggregates, evaluates and checkpoints as it always
does. A round where fewer than ``min_clients`` answered is retried (same clients, new
deadline). Under ``--secagg`` a round runs the four phases of `mlsyskit.fl.secagg` (each
bounded by the round timeout; the unmasking closes UNMASK_GRACE_S after the threshold is
reached); clients that drop after sharing their keys are recovered from the others' Shamir shares, and an attempt that falls below the threshold is retried. Updates that are not a float32 vector of the model's size (malformed, oversize,
wrong shape) are rejected here and logged with the client id; non-finite ones by the loop.
Bytes are counted as the gRPC message payloads this server sends and receives.
"""

from __future__ import annotations

import hmac
import secrets
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from mlsyskit.errors import UserError
from mlsyskit.fl import secagg, wire
from mlsyskit.fl.simulation import Collected, Federation, secagg_threshold

POLL_S = 10.0  # a GetTask long-poll answers "wait" after this long without a task
# the unmasking needs only t answers: once t are in, the others get this long, not the round timeout
UNMASK_GRACE_S = 1.0


@dataclass
class ServerOptions:
    """How the server listens and closes rounds (none of it changes the run's trajectory)."""

    address: str = "127.0.0.1:9092"
    min_clients: int = 1
    wait_for: int | None = None  # clients ready (data loaded, polling) before round 1; None: min_clients
    round_timeout: float = 60.0
    join_timeout: float = 300.0
    round_retries: int = 2
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tokens: dict[int, str] | None = None  # client id -> token; None: no token check (--insecure only)
    port_file: str | None = None  # where to write the bound port (for --address HOST:0)


def read_tokens(path: str) -> dict[int, str]:
    """A tokens file: one ``CLIENT_ID TOKEN`` per line, ``#`` comments."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read --tokens {path}: {e.strerror or e}") from None
    tokens: dict[int, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"--tokens {path} line {n}: expected 'CLIENT_ID TOKEN'")
        tokens[int(parts[0])] = parts[1]
    if not tokens:
        raise UserError(f"--tokens {path} holds no token")
    return tokens


@dataclass
class _Task:
    rnd: int
    attempt: int
    blob: bytes
    active: set[int]
    phase: str = "train"  # --secagg: train (then advertise keys), share, mask or unmask
    t: int = 0  # --secagg: the threshold
    head: dict[str, Any] = field(default_factory=dict)  # --secagg: what every client of the phase is told
    per_client: dict[int, dict[str, Any]] = field(default_factory=dict)  # --secagg: what one client is told
    received: dict[int, tuple[Any, float, float]] = field(default_factory=dict)  # id -> (w, loss, train_s)
    malformed: dict[int, str] = field(default_factory=dict)  # id -> why
    bytes_up: int = 0
    bytes_down: int = 0


def _log(msg: str) -> None:
    print(f"fl server: {msg}", file=sys.stderr, flush=True)


class GrpcTransport:
    """Serves the round loop's tasks to client processes over gRPC (see the module docstring)."""

    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.cond = threading.Condition()
        self.task: _Task | None = None
        self.finished = False
        self.joined: dict[int, float] = {}
        self.ready: set[int] = set()  # clients that have polled for a task (their data is loaded)
        self.told_done: set[int] = set()
        self.lagging: set[int] = set()  # missed the deadline of their last phase (dead or slow)
        self.server: grpc.Server | None = None
        self.fed: Federation | None = None
        self.global_w: torch.Tensor | None = None
        self.port = 0
        # names this server process in task ids, so a client that trained round r for a killed
        # server is served round r again by the resumed one
        self.instance = secrets.token_hex(4)

    # -- the Transport protocol ---------------------------------------------------------------
    def start(self, fed: Federation) -> None:
        self.fed = fed
        per_round = fed.strategy.clients_per_round(len(fed.parts), fed.cfg.fraction)
        if self.opts.min_clients > per_round:
            raise UserError(
                f"--min-clients {self.opts.min_clients} exceeds the {per_round} clients sampled a round "
                f"(--fraction {fed.cfg.fraction} of {len(fed.parts)})"
            )
        # every connected client holds one thread in its long-poll
        pool = futures.ThreadPoolExecutor(max_workers=2 * len(fed.parts) + 8)
        server = grpc.server(pool, options=[
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE + 4096),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ])
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(
                wire.SERVICE,
                {
                    "Join": grpc.unary_unary_rpc_method_handler(self._join),
                    "GetTask": grpc.unary_stream_rpc_method_handler(self._get_task),
                    "Submit": grpc.stream_unary_rpc_method_handler(self._submit),
                },
            )
        ])
        try:
            if self.opts.insecure:
                port = server.add_insecure_port(self.opts.address)
            else:
                creds = grpc.ssl_server_credentials(
                    [(Path(self.opts.tls_key).read_bytes(), Path(self.opts.tls_cert).read_bytes())]  # type: ignore[arg-type]
                )
                port = server.add_secure_port(self.opts.address, creds)
        except (RuntimeError, ValueError, OSError) as e:
            port = 0
            why = str(e).split(";")[0]
        else:
            why = "address in use?"
        if not port:
            raise UserError(
                f"cannot listen on --address {self.opts.address} ({why}); the run directory {fed.cfg.out} "
                "is kept (continue it with --resume)"
            )
        server.start()
        self.server, self.port = server, port
        host = self.opts.address.rsplit(":", 1)[0]
        _log(f"listening on {host}:{port} ({'plaintext' if self.opts.insecure else 'TLS'}), {len(fed.parts)} clients, run {fed.cfg.out}")
        if self.opts.port_file:
            Path(self.opts.port_file).write_text(f"{port}\n")
        need = self.opts.wait_for or self.opts.min_clients
        if need > len(fed.parts):
            raise UserError(f"--wait-for {need} exceeds the run's {len(fed.parts)} clients")
        deadline = time.monotonic() + self.opts.join_timeout
        with self.cond:
            while len(self.ready) < need:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UserError(
                        f"only {len(self.ready)} of {need} clients were ready within --join-timeout {self.opts.join_timeout:g} s"
                    )
                self.cond.wait(min(left, 1.0))

    def collect(self, fed: Federation, rnd: int, global_w: torch.Tensor, sampled: np.ndarray, active: np.ndarray) -> Collected:
        blob = wire.encode_model(global_w)
        self.global_w = global_w  # what --compress int8 updates are added to
        if fed.cfg.secagg:
            return self._collect_secure(fed, rnd, blob, [int(c) for c in active])
        ids = [int(c) for c in active]
        need = min(self.opts.min_clients, len(ids))
        tasks: list[_Task] = []
        attempt, retries = -1, 0
        while True:
            attempt += 1
            task = self._phase(_Task(rnd, attempt, blob, set(ids)))
            tasks.append(task)
            answered = len(task.received) + len(task.malformed)
            if answered >= need:
                break
            retries += 1
            self._too_few(rnd, f"{answered} of {len(ids)} sampled clients answered", need, retries)
        got = [c for c in ids if c in task.received]
        missing = [int(c) for c in active if c not in task.received and c not in task.malformed]
        if missing:
            _log(f"round {rnd}: no update from client(s) {missing} by the deadline; closing the round with {len(got)}")
        p = fed.num_params
        return Collected(
            ids=got,
            models=torch.stack([task.received[c][0] for c in got]) if got else torch.zeros(0, p),
            losses=torch.tensor([task.received[c][1] for c in got], dtype=torch.float32),
            train_s=max((task.received[c][2] for c in got), default=0.0),
            malformed=sorted(task.malformed),
            missing=missing,
            bytes_up=sum(t.bytes_up for t in tasks),
            bytes_down=sum(t.bytes_down for t in tasks),
        )

    def _phase(self, task: _Task, enough: int | None = None) -> _Task:
        """Publish `task`; wait until its clients all answered or --round-timeout passed, or
        (`enough`) until UNMASK_GRACE_S after that many answered."""
        deadline = time.monotonic() + self.opts.round_timeout
        with self.cond:
            self.task = task
            self.cond.notify_all()
            while len(task.received) + len(task.malformed) < len(task.active):
                if enough is not None and len(task.received) >= enough:
                    deadline = min(deadline, time.monotonic() + UNMASK_GRACE_S)
                    enough = None
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            self.task = None  # from now on an answer for this phase is late
            answered = set(task.received) | set(task.malformed)
            self.lagging = (self.lagging | (task.active - answered)) - answered
        return task

    def _too_few(self, rnd: int, what: str, need: int, retries: int) -> None:
        """Log a failed round attempt; UserError once --round-retries are used up."""
        giving_up = retries > self.opts.round_retries
        _log(f"round {rnd}: {what} within --round-timeout {self.opts.round_timeout:g} s, fewer than {need}; "
             + ("giving up" if giving_up else "retrying"))
        if giving_up:
            raise UserError(
                f"round {rnd}: {what}, fewer than {need}, in {retries} attempts; "
                "the run directory keeps the last checkpoint (continue with --resume)"
            )

    def _collect_secure(self, fed: Federation, rnd: int, blob: bytes, ids: list[int]) -> Collected:
        """Secure aggregation (`mlsyskit.fl.secagg`); an attempt that ends below the threshold
        is retried, re-keyed, among the clients still answering."""
        t = secagg_threshold(fed)
        need = max(t, min(self.opts.min_clients, len(ids)))
        tasks: list[_Task] = []
        live, attempt, retries = list(ids), -1, 0
        while True:
            attempt += 1
            got = self._secure_attempt(fed, rnd, attempt, blob, live, ids, need, t, tasks) if len(live) >= need else (f"{len(live)} clients left", live)
            if isinstance(got, Collected):
                return got
            what, live = got
            retries += 1
            self._too_few(rnd, f"secure aggregation: {what}", need, retries)

    def _secure_attempt(
        self, fed: Federation, rnd: int, attempt: int, blob: bytes, live: list[int], ids: list[int], need: int, t: int, tasks: list[_Task]
    ) -> Collected | tuple[str, list[int]]:
        """The four phases (train + keys, share, mask, unmask) once: the round's Collected, or
        (what fell short, the clients still answering)."""
        train = self._phase(_Task(rnd, attempt, blob, set(live), phase="train", t=t))
        tasks.append(train)
        u1 = [c for c in live if c in train.received]
        if len(u1) < need:
            return f"{len(u1)} clients advertised keys", u1
        keys = {c: train.received[c][0] for c in u1}
        share = self._phase(_Task(rnd, attempt, b"", set(u1), phase="share", t=t, head={"keys": keys}))
        tasks.append(share)
        u2 = [c for c in u1 if c in share.received and all(str(v) in share.received[c][0] for v in u1)]
        if len(u2) < need:
            return f"{len(u2)} clients shared their keys", u2
        held = {c: {"held": {str(u): share.received[u][0][str(c)] for u in u2}} for c in u2}
        masked = self._phase(_Task(rnd, attempt, b"", set(u2), phase="mask", t=t, head={"masked_set": u2}, per_client=held))
        tasks.append(masked)
        u3 = [c for c in u2 if c in masked.received]
        if len(u3) < need:
            return f"{len(u3)} masked updates arrived", u3
        unmask = self._phase(_Task(rnd, attempt, b"", set(u3), phase="unmask", t=t, head={"survivors": u3}), enough=t)
        tasks.append(unmask)
        try:
            total = secagg.recover_sum({c: masked.received[c][0] for c in u3}, keys, u2, {c: v[0] for c, v in unmask.received.items()}, t, rnd, attempt)
        except secagg.SecAggError as e:
            return f"unmasking failed ({e})", [c for c in u3 if c in unmask.received]
        gone = sorted(set(u2) - set(u3))
        _log(f"round {rnd}: unmasked the sum of clients {u3} with {len(unmask.received)} answers (threshold {t})"
             + (f"; recovered the masks of dropped client(s) {gone}" if gone else ""))
        return Collected(
            ids=u3, models=torch.zeros(0, fed.num_params),
            losses=torch.tensor([train.received[c][1] for c in u3], dtype=torch.float32),
            train_s=max((train.received[c][2] for c in u3), default=0.0), malformed=sorted(train.malformed),
            missing=[c for c in ids if c not in u3 and c not in train.malformed], summed=total,
            bytes_up=sum(x.bytes_up for x in tasks), bytes_down=sum(x.bytes_down for x in tasks),
        )

    def close(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()
            # let connected clients hear "done" (they poll at once), then stop; not waiting for the
            # ones that missed their last deadline: dead or slow, they would only hold up the end
            deadline = time.monotonic() + 3.0
            while not set(self.joined) - self.lagging <= self.told_done and time.monotonic() < deadline:
                self.cond.wait(0.1)
        if self.server is not None:
            # wait for the shutdown (ms once the last call ends): left pending, its grace timer
            # thread holds the process's exit for the whole second
            self.server.stop(grace=1.0).wait()

    # -- the gRPC handlers ---------------------------------------------------------------------
    def _auth(self, context: grpc.ServicerContext) -> int:
        md = dict(context.invocation_metadata())
        raw = str(md.get("x-client-id", ""))
        if not raw.isdigit():
            _log(f"refused a call from {context.peer()}: no client id")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing x-client-id")
        cid = int(raw)
        tokens = self.opts.tokens
        if tokens is not None:
            want = tokens.get(cid)
            if want is None or not hmac.compare_digest(want.encode(), str(md.get("x-token", "")).encode()):
                _log(f"refused client {cid} from {context.peer()}: wrong or missing token")
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"wrong or missing token for client {cid}")
        assert self.fed is not None
        if cid >= len(self.fed.parts):
            _log(f"refused client {cid} from {context.peer()}: the run has clients 0..{len(self.fed.parts) - 1}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"client id {cid} out of range 0..{len(self.fed.parts) - 1}")
        return cid

    def _join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        cid = self._auth(context)
        assert self.fed is not None
        with self.cond:
            first = cid not in self.joined
            self.joined[cid] = time.time()
            self.cond.notify_all()
        _log(f"client {cid} {'joined' if first else 'rejoined'} from {context.peer()} ({len(self.joined)} joined)")
        return wire.header({"client_id": cid, "config": self.fed.cfg.to_json(), "num_params": self.fed.num_params})

    def _get_task(self, request: bytes, context: grpc.ServicerContext):  # noqa: ANN202 - a generator of bytes
        cid = self._auth(context)
        try:
            done = wire.parse_header(request).get("done")
        except ValueError:
            done = None
        deadline = time.monotonic() + POLL_S
        with self.cond:
            self.joined.setdefault(cid, time.time())
            self.ready.add(cid)
            self.cond.notify_all()
            while True:
                if self.finished:
                    self.told_done.add(cid)
                    self.cond.notify_all()
                    head, task = {"status": "done"}, None
                    break
                task = self.task
                if task and cid in task.active and cid not in task.received and cid not in task.malformed and done != [self.instance, task.rnd, task.attempt, task.phase]:
                    head = {"status": "train", "round": task.rnd, "attempt": task.attempt, "phase": task.phase, "server": self.instance, "bytes": len(task.blob)}
                    if self.fed.cfg.secagg:
                        head.update(t=task.t, **task.head, **task.per_client.get(cid, {}))
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    head, task = {"status": "wait"}, None
                    break
                self.cond.wait(min(left, 1.0))
        msgs = wire.stream(head, task.blob) if task else [wire.header(head)]
        if task:
            with self.cond:
                task.bytes_down += sum(len(m) for m in msgs)
        yield from msgs

    def _decode(self, task: _Task, head: dict[str, Any], blob: bytes) -> Any:
        """What a client's submission for `task` carries; ValueError saying what is wrong."""
        assert self.fed is not None
        if not self.fed.cfg.secagg:
            return wire.decode_update(blob, self.fed.num_params, self.global_w, self.fed.cfg.compress)
        if task.phase == "mask":
            return wire.decode_masked(blob, self.fed.num_params)
        field_name = {"train": "keys", "share": "shares", "unmask": "reveal"}[task.phase]
        value = head.get(field_name)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"a {task.phase} answer without a {field_name!r} object")
        if task.phase == "train" and not all(isinstance(value.get(k), str) and len(value[k]) == 64 for k in ("c", "s")):
            raise ValueError("keys must be two 32-byte X25519 public keys in hex")
        return value

    def _submit(self, request_iterator, context: grpc.ServicerContext) -> bytes:  # noqa: ANN001
        cid = self._auth(context)
        assert self.fed is not None
        it = iter(request_iterator)
        try:
            first = next(it)
            head = wire.parse_header(first)
        except (StopIteration, ValueError, UnicodeDecodeError):
            _log(f"client {cid}: rejected a submission without a JSON header")
            return wire.header({"status": "rejected", "reason": "no JSON header"})
        with self.cond:
            task = self.task
        current = (
            task is not None and head.get("server") == self.instance and head.get("round") == task.rnd
            and head.get("attempt") == task.attempt and head.get("phase", "train") == task.phase and cid in task.active
        )
        limit = 4 * self.fed.num_params + 8192
        buf = bytearray()
        reason = None
        for msg in it:
            buf += msg
            if len(buf) > limit:
                reason = f"oversize update (more than {limit} bytes)"
                break
        size = len(first) + len(buf)
        if not current or task is None:
            _log(f"client {cid}: update for round {head.get('round')} arrived after its deadline; ignored")
            return wire.header({"status": "late"})
        w = None
        if reason is None:
            try:
                w = self._decode(task, head, bytes(buf))
            except ValueError as e:
                reason = str(e)
        loss = head.get("loss")
        loss = float(loss) if isinstance(loss, (int, float)) else float("nan")
        train_s = head.get("train_s")
        train_s = float(train_s) if isinstance(train_s, (int, float)) else 0.0
        with self.cond:
            task.bytes_up += size
            if self.task is not task:  # the round closed while this update streamed in
                _log(f"client {cid}: update for round {task.rnd} arrived after its deadline; ignored")
                return wire.header({"status": "late"})
            if cid in task.received or cid in task.malformed:
                return wire.header({"status": "duplicate"})
            if w is None:
                task.malformed[cid] = reason or "?"
            else:
                task.received[cid] = (w, loss, train_s)
            self.cond.notify_all()
        if w is None:
            _log(f"client {cid}: rejected its update for round {task.rnd}: {reason}")
            return wire.header({"status": "rejected", "reason": reason})
        return wire.header({"status": "ok"})
