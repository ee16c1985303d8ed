"""An FL client process: joins the server over gRPC, trains its own partition, sends its model.

The client gets the run's config from the server, splits the data with the same partitioner
and seed as the simulation, keeps only its own part (by client id) and trains with the same
client code (`simulation.train_clients`, same batch plan per (seed, round, client)), so a
deployed run follows the simulation's trajectory. Under --secagg it answers the server's four
phases (`mlsyskit.fl.secagg`). Fault flags (`delay`, `fault`) exist to test the server's
deadline, its rejection of bad updates and secure aggregation's dropout recovery (the
``drop-*-mask`` faults SIGKILL the client process itself at that point of the protocol).
One process may host several clients (`run_clients`, ``--client-id 0-9``): a thread, a gRPC
channel and a session each, one data load between them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from mlsyskit.errors import UserError
from mlsyskit.fl import secagg, wire
from mlsyskit.fl.config import FLConfig
from mlsyskit.fl.simulation import (
    Federation,
    poison_update,
    secagg_contribution,
    setup,
    train_clients,
)

FAULTS = ("nan", "wrong-shape", "garbage", "oversize", "drop-before-mask", "drop-after-mask")


@dataclass
class ClientOptions:
    server: str
    client_id: int
    data_dir: str | None = None
    insecure: bool = False
    tls_ca: str | None = None
    token: str | None = None
    delay: float = 0.0  # seconds to sleep before sending each update (a slow client)
    fault: str | None = None  # send a bad update instead of the trained one
    connect_timeout: float = 60.0
    threads: int | None = None


class _Client:
    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        # gRPC's reconnect backoff grows to minutes by default: a client started before its
        # server listens (fl launch), or one whose server restarts (--resume), would find it
        # seconds late; every 0.2-1 s is cheap on a handful of channels
        backoff = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
        if opts.insecure:
            self.channel = grpc.insecure_channel(opts.server, options=backoff)
        else:
            ca = Path(opts.tls_ca).read_bytes()  # type: ignore[arg-type]
            self.channel = grpc.secure_channel(opts.server, grpc.ssl_channel_credentials(root_certificates=ca), options=backoff)
        self.md = [("x-client-id", str(opts.client_id)), ("x-token", opts.token or "")]
        self.join_rpc = self.channel.unary_unary(wire.JOIN)
        self.task_rpc = self.channel.unary_stream(wire.GET_TASK)
        self.submit_rpc = self.channel.stream_unary(wire.SUBMIT)

    def log(self, msg: str) -> None:
        print(f"fl client {self.opts.client_id}: {msg}", file=sys.stderr, flush=True)

    def call(self, what: str, fn: Any) -> Any:
        """Run `fn`; while the server is unreachable retry for --connect-timeout seconds."""
        deadline = time.monotonic() + self.opts.connect_timeout
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise UserError(f"the server refused this client: {details} (check --token)") from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise UserError(f"the server refused this client: {details}") from None
                low = details.lower()
                if any(k in low for k in ("ssl", "handshake", "certificate", "tls")):
                    raise UserError(f"TLS with {self.opts.server} failed: {details} (check --tls-ca)") from None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or time.monotonic() > deadline:
                    raise UserError(f"{what} on {self.opts.server} failed: {code.name}: {details}") from None
                time.sleep(0.2)

    def join(self) -> dict[str, Any]:
        head = wire.header({"client_id": self.opts.client_id})
        reply = self.call("joining", lambda: self.join_rpc(head, metadata=self.md, timeout=10))
        return wire.parse_header(reply)


class SharedSetup:
    """One data load for the clients a process hosts (``--client-id 0-9``): the first to join
    runs `setup`, the others take their own part of it (and their own copy of the model)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.feds: dict[str, Federation] = {}

    def get(self, cfg: FLConfig) -> Federation:
        key = json.dumps(cfg.to_json(), sort_keys=True)
        with self.lock:  # setup seeds torch's global generator: one at a time
            if key not in self.feds:
                self.feds[key] = setup(cfg)
            return self.feds[key]


def _local_federation(cfg: FLConfig, client_id: int, shared: SharedSetup | None = None) -> Federation:
    """The run's federation as this client sees it: only its own training samples kept."""
    fed = shared.get(cfg) if shared else setup(cfg)
    if client_id >= len(fed.parts):
        raise UserError(f"--client-id {client_id} is out of range: the run has clients 0..{len(fed.parts) - 1}")
    own = torch.from_numpy(fed.parts[client_id])
    data = dataclasses.replace(
        fed.data, train_x=fed.data.train_x[own], train_y=fed.data.train_y[own], test_x=fed.data.test_x[:0], test_y=fed.data.test_y[:0]
    )
    empty = np.zeros(0, dtype=np.int64)
    parts = [np.arange(len(own)) if c == client_id else empty for c in range(len(fed.parts))]
    # a model of its own: training writes into it (and vmap swaps its parameters)
    model = copy.deepcopy(fed.model) if shared else fed.model
    return dataclasses.replace(fed, data=data, parts=parts, model=model)


def _payload(w: torch.Tensor, fault: str | None, global_w: torch.Tensor, cfg: FLConfig) -> bytes:
    if fault == "nan":
        return wire.encode_model(torch.full_like(w, float("nan")))
    if fault == "wrong-shape":
        return wire.encode_model(w[:-1].clone())
    if fault == "garbage":
        return b"this is not a safetensors file" * 10
    if fault == "oversize":
        return wire.encode_model(torch.cat([w, w, w]))
    return wire.encode_update(w, global_w, cfg.compress)


def run_clients(opts: ClientOptions, ids: list[int], faults: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Host several clients in this process, one thread each: each has its own gRPC channel
    and session (and --secagg keys) and its own partition, from one data load. `faults`
    overrides ``opts.fault`` per client (a ``drop-*-mask`` fault kills every client of the
    process with it). Returns what each did, in `ids` order; the first error of any is raised
    once all have ended."""
    faults = faults or {}
    each = {cid: dataclasses.replace(opts, client_id=cid, fault=faults.get(cid, opts.fault)) for cid in ids}
    if len(ids) == 1:
        return [run_client(each[ids[0]])]
    shared = SharedSetup()
    results: dict[int, dict[str, Any] | BaseException] = {}

    def host(cid: int) -> None:
        try:
            results[cid] = run_client(each[cid], shared)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            results[cid] = e

    threads = [threading.Thread(target=host, args=(cid,), name=f"client-{cid}", daemon=True) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return [results[cid] for cid in ids]  # type: ignore[misc]


def run_client(opts: ClientOptions, shared: SharedSetup | None = None) -> dict[str, Any]:
    """Join, then train and send until the server says the run is done; returns what it did."""
    client = _Client(opts)
    info = client.join()
    names = {f.name for f in dataclasses.fields(FLConfig)}
    cfg = FLConfig(**{k: v for k, v in info["config"].items() if k in names})
    cfg = dataclasses.replace(cfg, data_dir=opts.data_dir, out=None, threads=opts.threads or cfg.threads)
    fed = _local_federation(cfg, opts.client_id, shared)
    if fed.num_params != info["num_params"]:
        raise UserError(f"this client's model has {fed.num_params} parameters, the server's {info['num_params']}")
    client.log(f"joined {opts.server}: {cfg.model} on {cfg.dataset}, {len(fed.data.train_x)} samples of its own")
    done: list[Any] | None = None  # [server instance, round, attempt, phase] last answered
    rounds = 0
    secure: dict[tuple[Any, int, int], tuple[Any, np.ndarray]] = {}  # --secagg: (server, round, attempt) -> (session, values)
    while True:
        msgs = client.call(
            "polling",
            lambda done=done: list(client.task_rpc(wire.header({"done": done}), metadata=client.md, timeout=60)),
        )
        head = wire.parse_header(msgs[0])
        if head["status"] == "done":
            client.log(f"the server finished the run; {rounds} round(s) trained")
            return {"client_id": opts.client_id, "rounds": rounds}
        if head["status"] != "train":
            continue
        rnd, attempt, phase = int(head["round"]), int(head["attempt"]), head.get("phase", "train")
        done = [head.get("server"), rnd, attempt, phase]
        up: dict[str, Any] = {"client_id": opts.client_id, "server": head.get("server"), "round": rnd, "attempt": attempt, "phase": phase}
        if phase == "train":
            global_w = wire.decode_model(b"".join(msgs[1:]), fed.num_params)
            client.log(f"round {rnd}: training")
            t0 = time.perf_counter()
            models, losses = train_clients(fed, rnd, global_w, np.array([opts.client_id]))
            w = models[0]
            if opts.client_id in fed.malicious:
                w = poison_update(fed, rnd, opts.client_id, w, global_w)
            if opts.delay:
                time.sleep(opts.delay)
            up.update(loss=float(losses[0]), train_s=time.perf_counter() - t0)
            if cfg.secagg:  # send the round's public keys; the update goes masked in phase "mask"
                session = secagg.ClientRound(opts.client_id, rnd, attempt)
                secure = {(head.get("server"), rnd, attempt): (session, secagg.encode(secagg_contribution(fed, opts.client_id, w, global_w)))}
                up["keys"], payload = session.advertise(), b""
            else:
                payload = _payload(w, opts.fault, global_w, cfg)
            rounds += 1
        else:
            state = secure.get((head.get("server"), rnd, attempt))
            if state is None:
                client.log(f"round {rnd}: no keys for attempt {attempt} (restarted?); skipping its {phase} phase")
                continue
            session, values = state
            if phase == "mask" and opts.fault == "drop-before-mask":
                client.log(f"round {rnd}: fault injection: dying before sending the masked update")
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                payload = b""
                if phase == "share":
                    up["shares"] = {str(v): ct for v, ct in session.share(head["keys"], int(head["t"])).items()}
                elif phase == "mask":
                    payload = wire.encode_masked(session.masked_input(values, head["masked_set"], head["held"]))
                else:
                    up["reveal"] = {str(v): r for v, r in session.unmask(head["survivors"], int(head["t"])).items()}
            except (secagg.SecAggError, KeyError, TypeError, ValueError) as e:
                client.log(f"round {rnd}: not answering the {phase} phase: {e}")
                continue
        msgs_up = wire.stream(up, payload)
        reply = client.call("sending", lambda msgs_up=msgs_up: client.submit_rpc(iter(msgs_up), metadata=client.md, timeout=60))
        status = wire.parse_header(reply)
        what = "masked update" if phase == "mask" else "update" if phase == "train" and not cfg.secagg else phase
        client.log(f"round {rnd}: sent {sum(len(m) for m in msgs_up)} bytes ({what}): {status['status']}" + (f" ({status['reason']})" if status.get("reason") else ""))
        if phase == "mask" and opts.fault == "drop-after-mask":
            client.log(f"round {rnd}: fault injection: dying after sending the masked update")
            os.kill(os.getpid(), signal.SIGKILL)
