"""The gRPC transport of the FL round loop: client processes on other machines (or this one).

`GrpcTransport` plugs into `mlsyskit.fl.simulation`'s round loop in place of the in-process
simulation: the loop samples, the transport publishes the global model to the sampled clients
(who long-poll ``GetTask``), collects their models (``Submit``) until all answered or the
round's deadline, and the loop rejects, aggregates, evaluates and checkpoints as it always
does. A round where fewer than ``min_clients`` answered is retried (same clients, new
deadline). Updates that are not a float32 vector of the model's size (malformed, oversize,
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
from mlsyskit.fl import wire
from mlsyskit.fl.simulation import Collected, Federation

POLL_S = 10.0  # a GetTask long-poll answers "wait" after this long without a task


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
    peers: dict[int, str] = field(default_factory=dict)  # --secagg: the masked set's public keys (hex)
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
        self.pubkeys: dict[int, str] = {}  # --secagg: each client's X25519 public key (hex)
        self.ready: set[int] = set()  # clients that have polled for a task (their data is loaded)
        self.told_done: set[int] = set()
        self.server: grpc.Server | None = None
        self.fed: Federation | None = None
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
        ids = [int(c) for c in active]
        need = min(self.opts.min_clients, len(ids))
        secure = fed.cfg.secagg
        tasks: list[_Task] = []
        attempt, retries = -1, 0
        while True:
            attempt += 1
            if secure:  # the masked set: clients whose public key the server holds
                ids = [c for c in ids if c in self.pubkeys]
            task = _Task(rnd, attempt, blob, set(ids), peers={c: self.pubkeys[c] for c in ids} if secure else {})
            tasks.append(task)
            deadline = time.monotonic() + self.opts.round_timeout
            with self.cond:
                self.task = task
                self.cond.notify_all()
                while len(task.received) + len(task.malformed) < len(ids):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                self.task = None  # from now on an update for this round is late
            answered = len(task.received) + len(task.malformed)
            got = [c for c in ids if c in task.received]
            if answered >= need and (not secure or len(got) == len(ids)):
                break
            if secure and len(got) >= need:
                # masks cancel only over the whole masked set: rerun, re-keyed, among those who
                # answered (the set shrinks each time, so this ends; it is not a retry)
                _log(f"round {rnd}: secure aggregation needs every masked update; rerunning among clients {got}")
                ids = got
                continue
            retries += 1
            _log(
                f"round {rnd}: {answered} of {len(ids)} sampled clients answered within --round-timeout "
                f"{self.opts.round_timeout:g} s, fewer than --min-clients {need}; "
                + ("retrying" if retries <= self.opts.round_retries else "giving up")
            )
            if retries > self.opts.round_retries:
                raise UserError(
                    f"round {rnd}: fewer than --min-clients {need} clients answered in {retries} attempts; "
                    "the run directory keeps the last checkpoint (continue with --resume)"
                )
        got = [c for c in ids if c in task.received]
        missing = [int(c) for c in active if c not in task.received and c not in task.malformed]
        if missing:
            _log(f"round {rnd}: no update from client(s) {missing} by the deadline; closing the round with {len(got)}")
        p = fed.num_params
        if secure:
            return Collected(
                ids=got, models=torch.zeros(0, p), losses=torch.tensor([task.received[c][1] for c in got], dtype=torch.float32),
                train_s=max((task.received[c][2] for c in got), default=0.0), malformed=sorted(task.malformed), missing=missing,
                masked=[task.received[c][0] for c in got], bytes_up=sum(t.bytes_up for t in tasks), bytes_down=sum(t.bytes_down for t in tasks),
            )
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

    def close(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()
            # let connected clients hear "done" (they poll at once), then stop
            deadline = time.monotonic() + 3.0
            while not set(self.joined) <= self.told_done and time.monotonic() < deadline:
                self.cond.wait(0.1)
        if self.server is not None:
            self.server.stop(grace=1.0)

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
        try:
            pub = wire.parse_header(request).get("pub")
        except ValueError:
            pub = None
        with self.cond:
            first = cid not in self.joined
            self.joined[cid] = time.time()
            if isinstance(pub, str) and len(pub) == 64:
                self.pubkeys[cid] = pub
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
                if task and cid in task.active and cid not in task.received and cid not in task.malformed and done != [self.instance, task.rnd, task.attempt]:
                    head = {"status": "train", "round": task.rnd, "attempt": task.attempt, "server": self.instance, "bytes": len(task.blob)}
                    if task.peers:
                        head["peers"] = task.peers
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
            and head.get("attempt") == task.attempt and cid in task.active
        )
        limit = (len(task.blob) if task else 4 * self.fed.num_params + 4096) + 4096
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
                decode = wire.decode_masked if self.fed.cfg.secagg else wire.decode_model
                w = decode(bytes(buf), self.fed.num_params)
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
