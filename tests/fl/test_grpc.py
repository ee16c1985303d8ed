"""Federated learning across real processes over gRPC on 127.0.0.1: server, clients, faults, TLS.

Every test starts `python -m mlsyskit fl server` and `fl client` processes for real (free
loopback ports), with a tiny model (logreg, trained by the sequential client path: no vmap
warm-up) on a few clients for one to three rounds, and deadlines of a few seconds where a test
waits for one. A process costs seconds (python + torch import), so: clients start with their
server, not after it (they retry until it listens); clients whose point is not a process of
their own share one (`fl client --client-id 0-4`: a thread and a gRPC session each); a client
that only needs the client code over the real network runs in this process; and the in-process
simulation a deployment is compared with runs while the processes start.
"""

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from mlsyskit.cli import main
from mlsyskit.errors import UserError
from mlsyskit.fl import FLConfig, run, wire
from mlsyskit.fl.client import evaluate
from mlsyskit.fl.grpc_client import ClientOptions, run_client, run_clients
from mlsyskit.fl.params import get_flat
from mlsyskit.fl.simulation import setup, train_clients

WAIT_S = 240  # generous: several processes import torch on a shared, loaded machine


def _run_flags(data_dir, clients, rounds=1):
    flags = ["--dataset", "mnist-5k", "--model", "logreg", "--clients", str(clients), "--fraction", "1",
             "--local-epochs", "1", "--batch-size", "50", "--lr", "0.1", "--rounds", str(rounds), "--client-exec", "sequential"]
    return flags + (["--data-dir", str(data_dir)] if data_dir else [])


def _mlsyskit(*args, log=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "mlsyskit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=log if log is not None else subprocess.PIPE, text=True, **kw)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fl server` on a free port; returns at once (clients retry until it listens)."""

    def __init__(self, tmp_path, *flags, address=None, name="server"):
        self.address = address or f"127.0.0.1:{_free_port()}"
        self.port_file = tmp_path / f"{name}.port"
        self.out = tmp_path / "run"
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = _mlsyskit("fl", "server", "--address", self.address, "--port-file", self.port_file,
                              "--out", self.out, "--no-progress", *flags, log=self.log)

    def listening(self):
        deadline = time.monotonic() + WAIT_S
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, "server never listened"
            time.sleep(0.05)
        assert self.address.endswith(":" + self.port_file.read_text().strip())

    def text(self):
        return self.log_path.read_text()

    def wait(self):
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        assert rc == 0, self.text()
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]


def _client(server, k, data_dir, *flags):
    data = ["--data-dir", data_dir] if data_dir else []
    return _mlsyskit("fl", "client", "--server", server.address, "--client-id", k, "--connect-timeout", WAIT_S, *data, *flags)


class ClientsHere:
    """Clients in threads of this process (`run_clients`, the code of `fl client --client-id A-B`),
    over the real network: for clients whose point is not a process of their own (one torch
    import fewer than a client process)."""

    def __init__(self, server, ids, data_dir, faults=None):
        opts = ClientOptions(server=server.address, client_id=ids[0], data_dir=str(data_dir) if data_dir else None,
                             insecure=True, connect_timeout=WAIT_S)
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(opts, ids, faults), daemon=True)
        self.thread.start()

    def _run(self, opts, ids, faults):
        try:
            self.result = run_clients(opts, ids, faults)
        except BaseException as e:  # noqa: BLE001 - re-raised by results()
            self.result = e

    def results(self):
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "the clients never heard the run end"
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_launch_follows_the_simulation_trajectory(tmp_path, data_dir):
    flags = _run_flags(data_dir, clients=3, rounds=2)
    # clients 0 and 1 share a process, client 2 has its own
    launch = _mlsyskit("fl", "launch", *flags, "--out", tmp_path / "deployed", "--clients-per-process", "2",
                       "--round-timeout", "120", "--no-progress")
    try:  # the simulation in this process while the deployment's processes start
        cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", client_exec="sequential", clients=3,
                       fraction=1.0, local_epochs=1, batch_size=50, lr=0.1, rounds=2, out=str(tmp_path / "sim"))
        sim_summary = run(cfg, progress=False)
        stdout, stderr = launch.communicate(timeout=WAIT_S)
    finally:
        _stop(launch)
    assert launch.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    deployed = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    simulated = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in deployed] == [1, 2]
    for d, s in zip(deployed, simulated, strict=True):
        assert d["clients"] == s["clients"] == 3 and d["dropped"] == [] and d["rejected"] == []
        assert d["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=2e-3)
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-3)
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-3)
        # real bytes on the wire: the model (4 bytes per parameter) plus safetensors and JSON headers
        model_bytes = 4 * sim_summary["parameters"]
        assert 3 * model_bytes < d["bytes_up"] < 3 * (model_bytes + 2000)
        assert 3 * model_bytes < d["bytes_down"] < 3 * (model_bytes + 2000)
    assert summary["final_accuracy"] > 0.7  # chance is 0.1
    for f in ("config.json", "summary.json", "model.safetensors", "checkpoint.safetensors", "partition.json"):
        assert (tmp_path / "deployed" / f).stat().st_size > 0
    for k in range(3):  # each its own session, also the two of one process
        assert f"fl client {k}: joined" in stderr and f"fl server: client {k} joined" in stderr


FAULTS = {1: "wrong-shape", 2: "garbage", 3: "nan", 4: "oversize"}
KILLED, SLOW, DEADLINE = 5, 6, 4  # the others train logreg sequentially in well under a second, even loaded


@pytest.fixture(scope="module")
def faulty_round(tmp_path_factory, data_dir):
    """One round of 7 clients, shared by the fault tests: client 0 honest and 1-4 sending bad
    updates (in this process), 5 SIGKILLed mid-round, 6 slow (sleeps 30 s before sending)."""
    tmp_path = tmp_path_factory.mktemp("faulty")
    server = Server(tmp_path, *_run_flags(data_dir, clients=7), "--insecure", "--min-clients", "5",
                    "--wait-for", "7", "--round-timeout", DEADLINE)
    procs = {KILLED: _client(server, KILLED, data_dir, "--insecure", "--delay", "30"),
             SLOW: _client(server, SLOW, data_dir, "--insecure", "--delay", "30")}
    here = ClientsHere(server, list(range(5)), data_dir, FAULTS)
    try:
        for line in procs[KILLED].stderr:  # SIGKILL it mid-round: after it got the model, before it answers
            if "round 1: training" in line:
                procs[KILLED].send_signal(signal.SIGKILL)
                break
        (row,) = server.wait()
        results = here.results()
    finally:
        _stop(*procs.values())
    return row, server.text(), {k: p.returncode for k, p in procs.items()}, results


def test_killed_and_slow_clients_do_not_stall_the_round(faulty_round):
    row, log, codes, results = faulty_round
    assert codes[KILLED] == -signal.SIGKILL
    assert row["dropped"] == [KILLED, SLOW] and row["clients"] == 5
    assert DEADLINE - 0.5 < row["wall_s"] < DEADLINE + 15  # closed at the deadline, not after the 30 s delay
    assert f"no update from client(s) [{KILLED}, {SLOW}] by the deadline" in log
    # the five clients of one process were each told the run is over
    assert results == [{"client_id": k, "rounds": 1} for k in range(5)]


def test_bad_updates_are_rejected_and_logged_with_the_client_id(faulty_round):
    row, log, _, _ = faulty_round
    assert row["rejected"] == [1, 2, 3, 4]
    assert row["test_accuracy"] > 0.5  # client 0's honest update was aggregated; the server kept serving
    assert "client 1: rejected its update for round 1: wrong shape" in log
    assert "client 2: rejected its update for round 1: not a safetensors blob" in log
    assert "client 4: rejected its update for round 1: oversize" in log
    assert "non-finite update(s) from client(s) [3]" in log


def _self_signed(tmp_path, name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_tokens_refuse_a_wrong_token_or_certificate(tmp_path, data_dir):
    cert, key = _self_signed(tmp_path, "server")
    other_ca, _ = _self_signed(tmp_path, "other")
    tokens = tmp_path / "tokens"
    tokens.write_text("# id token\n0 s3cret-zero\n")
    server = Server(tmp_path, *_run_flags(data_dir, clients=1), "--tls-cert", cert, "--tls-key", key, "--tokens", tokens,
                    "--round-timeout", 120)
    server.listening()
    # the clients run in this process (the client code of `fl client`, over real TLS)
    bad = ClientOptions(server=server.address, client_id=0, tls_ca=str(cert), token="guess", connect_timeout=20)
    with pytest.raises(UserError, match="refused this client"):
        run_client(bad)
    with pytest.raises(UserError, match="TLS"):
        run_client(ClientOptions(server=server.address, client_id=0, tls_ca=str(other_ca), token="s3cret-zero", connect_timeout=20))
    good = ClientOptions(server=server.address, client_id=0, data_dir=str(data_dir) if data_dir else None, tls_ca=str(cert),
                         token="s3cret-zero", connect_timeout=20)
    try:
        assert run_client(good) == {"client_id": 0, "rounds": 1}
    except BaseException:
        server.proc.kill()  # it would wait for its client until --join-timeout
        raise
    rows = server.wait()
    assert rows[0]["clients"] == 1 and rows[0]["test_accuracy"] > 0.5
    assert "refused client 0" in server.text() and "wrong or missing token" in server.text()


def test_plaintext_needs_an_explicit_insecure(tmp_path, capsys):
    # the CLI in this process: refused before anything listens or connects
    for args in (["fl", "server", "--out", str(tmp_path / "x")], ["fl", "client", "--server", "127.0.0.1:1", "--client-id", "0"],
                 ["fl", "client", "--server", "127.0.0.1:1", "--client-id", "0-1", "--tls-ca", "ca.pem"]):
        assert main(args) == 2
        assert "--insecure" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_wire_decoding_rejects_what_is_not_the_model():
    w = torch.arange(6, dtype=torch.float32)
    assert torch.equal(wire.decode_model(wire.encode_model(w), 6), w)
    for blob, why in [
        (wire.encode_model(w[:5].clone()), "wrong shape"),
        (wire.encode_model(w.double()), "dtype"),
        (b"\x00" * 64, "not a safetensors"),
    ]:
        with pytest.raises(ValueError, match=why):
            wire.decode_model(blob, 6)
    assert b"".join(list(wire.stream({"a": 1}, b"x" * (wire.CHUNK + 1)))[1:]) == b"x" * (wire.CHUNK + 1)
    assert os.environ.get("OMP_NUM_THREADS") == "1"  # conftest: one thread per process


def test_killed_server_resumes_and_clients_reconnect_with_int8_updates(tmp_path, data_dir):
    flags = [*_run_flags(data_dir, clients=2, rounds=3), "--compress", "int8", "--insecure", "--wait-for", "2", "--round-timeout", 120]
    first = Server(tmp_path, *flags)
    clients = [_client(first, "0-1", data_dir, "--insecure", "--delay", "0.5")]  # both in one process
    try:
        ckpt = first.out / "checkpoint.safetensors"
        deadline = time.monotonic() + WAIT_S
        while not ckpt.exists():  # round 1 committed; round 2 is under way (clients delay 0.5 s)
            assert first.proc.poll() is None and time.monotonic() < deadline, first.text()
            time.sleep(0.02)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        first.log.close()
        killed_at = len((first.out / "metrics.jsonl").read_text().splitlines())
        assert killed_at < 3, "the run ended before the kill"
        second = Server(tmp_path, "--resume", first.out, "--insecure", "--wait-for", "2", "--round-timeout", 120,
                        address=first.address, name="resumed")
        # the simulation in this process while the resumed server starts
        cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", client_exec="sequential", clients=2,
                       fraction=1.0, local_epochs=1, batch_size=50, lr=0.1, rounds=3, compress="int8", out=str(tmp_path / "sim"))
        run(cfg, progress=False)
        rows = second.wait()
        outs = [p.communicate(timeout=WAIT_S) for p in clients]
    finally:
        _stop(*clients)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(p.returncode == 0 for p in clients), outs
    simulated = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip(rows, simulated, strict=True):  # the resumed deployment continues the same trajectory
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-3)
        # int8 updates on the wire: about a quarter of the float32 model (4 * 7850 bytes) each
        assert 2 * 4 * 7850 / 4.2 < d["bytes_up"] < 2 * 4 * 7850 / 3.5


def test_secure_aggregation_recovers_clients_killed_mid_protocol(tmp_path, data_dir):
    # client 2 SIGKILLs itself after sharing its keys, before masking; client 3 right after
    # sending its masked update: the server unmasks the sum of 0, 1 and 3 from 0 and 1's shares
    # (clients 0 and 1 in this process, each its own keys and session)
    server = Server(tmp_path, *_run_flags(data_dir, clients=4), "--secagg", "--secagg-threshold", "2", "--insecure",
                    "--min-clients", "2", "--wait-for", "4", "--round-timeout", 3)
    procs = [_client(server, 2, data_dir, "--insecure", "--fault", "drop-before-mask"),
             _client(server, 3, data_dir, "--insecure", "--fault", "3=drop-after-mask")]
    here = ClientsHere(server, [0, 1], data_dir)
    try:
        rows = server.wait()
        assert here.results() == [{"client_id": 0, "rounds": 1}, {"client_id": 1, "rounds": 1}]
    finally:
        _stop(*procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]
    (row,) = rows
    assert row["dropped"] == [2] and row["clients"] == 3 and row["rejected"] == []
    assert "unmasked the sum of clients [0, 1, 3] with 2 answers (threshold 2); recovered the masks of dropped client(s) [2]" in server.text()
    # the committed model is plain FedAvg of clients 0, 1 and 3, within the fixed-point step
    cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", client_exec="sequential", clients=4,
                   fraction=1.0, local_epochs=1, batch_size=50, lr=0.1, rounds=1).resolved()
    fed = setup(cfg)
    w0 = get_flat(fed.model)
    ids = np.array([0, 1, 3])
    models, _ = train_clients(fed, 1, w0, ids)
    weights = torch.from_numpy(fed.counts[ids]).float()
    mean = (models * weights[:, None]).sum(0) / weights.sum()
    _, loss = evaluate(fed.model, mean, fed.data.test_x, fed.data.test_y)
    assert row["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_secure_aggregation_below_threshold_fails_cleanly(tmp_path, data_dir):
    server = Server(tmp_path, *_run_flags(data_dir, clients=3), "--secagg", "--secagg-threshold", "3", "--insecure",
                    "--wait-for", "3", "--round-timeout", 3, "--round-retries", "1")
    procs = [_client(server, 2, data_dir, "--insecure", "--fault", "drop-after-mask")]
    here = ClientsHere(server, [0, 1], data_dir)
    try:
        rc = server.proc.wait(timeout=WAIT_S)
        survivors = here.results()
    finally:
        _stop(*procs)
        server.log.close()
    log = server.text()
    assert rc == 2 and "Traceback" not in log
    assert "round 1: secure aggregation: unmasking failed (only 2 clients answered the unmasking, fewer than the threshold 3)" in log
    assert "secure aggregation: 2 clients left, fewer than 3, in 2 attempts" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    assert survivors == [{"client_id": 0, "rounds": 1}, {"client_id": 1, "rounds": 1}]  # told the run is over


def test_launched_processes_share_the_cores_unless_the_user_set_openmp_threads(monkeypatch):
    from mlsyskit.fl.cli import _child_env

    cores = os.cpu_count() or 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _child_env(cores + 1)["OMP_NUM_THREADS"] == "1"  # more processes than cores: 1 each
    assert _child_env(1)["OMP_NUM_THREADS"] == str(cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _child_env(cores + 1)["OMP_NUM_THREADS"] == "3"  # the user's choice stands
