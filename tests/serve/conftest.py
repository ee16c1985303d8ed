"""Real servers for the serving tests.

``start_server(**flags) -> base_url`` (module scope) starts ``mlsyskit serve`` in a subprocess on
127.0.0.1 with a free port (``--port 0``, the port is read from the ready line), the SmolLM2 GGUF,
one torch thread, a small KV pool and context, and waits until it answers ``/health``. Flags are
``mlsyskit serve`` flags with underscores (``max_queue=1`` -> ``--max-queue 1``; ``True`` -> a bare
flag; ``None``/``False`` -> omitted). The RAG routes are off (``--no-rag``) unless ``docs=`` or
``no_rag=False`` is given: embedding the default corpus would slow every start. The returned URL is a ``str`` that also carries ``.proc``
(the ``subprocess.Popen``), ``.log`` (its output file) and ``.model`` (the served model id).
Every server of a module is stopped with SIGTERM at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

READY = re.compile(r"serving (\S+) on (http://\S+) ")
SERVER_DEFAULTS = {
    "threads": 1,
    "max_model_len": 512,
    "num_kv_blocks": 256,  # 4096 tokens of KV (~190 MB for SmolLM2): plenty for the tests
    "log_level": "warning",
}


class ServerURL(str):
    """A server's base URL, with the process behind it."""

    proc: subprocess.Popen
    log: Path
    model: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def server_command(model: Path, flags: dict) -> list[str]:
    args = [sys.executable, "-m", "mlsyskit.cli", "serve", "--model", str(model), "--port", "0"]
    if "docs" not in flags:
        flags = {"no_rag": True, **flags}
    for key, value in {**SERVER_DEFAULTS, **flags}.items():
        if value is None or value is False:
            continue
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args


def launch(cmd: list[str], log: Path, *, env: dict | None = None, timeout: float = 180.0) -> ServerURL:
    """Start ``cmd`` (a ``mlsyskit serve`` command line) and wait for its ready line and /health."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    full_env.pop("MLSYSKIT_API_KEY", None)  # only the test's flags and env decide the key
    full_env.update(env or {})
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        m = READY.search(text)
        if m:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{text}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{text}")
        time.sleep(0.1)
    url = ServerURL(m.group(2))
    url.proc, url.log, url.model = proc, log, m.group(1)
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}/health never answered 200:\n{url.log_text()}")


def stop(url: ServerURL, timeout: float = 30.0) -> int:
    """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
    if url.proc.poll() is None:
        url.proc.send_signal(signal.SIGTERM)
        try:
            url.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            url.proc.kill()
            url.proc.wait()
    return url.proc.returncode


@pytest.fixture(scope="module")
def start_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerURL]]:
    """Factory: ``start_server(**flags)`` -> base URL of a running ``mlsyskit serve``."""
    servers: list[ServerURL] = []
    folder = tmp_path_factory.mktemp("servers")

    def start(*, env: dict | None = None, **flags: object) -> ServerURL:
        log = folder / f"server{len(servers)}.log"
        url = launch(server_command(smollm2_path, flags), log, env=env)
        servers.append(url)
        return url

    yield start
    for url in servers:
        stop(url)


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ServerURL]) -> ServerURL:
    """One default server (continuous batching) shared by a module's tests."""
    return start_server()


@pytest.fixture(scope="session")
def launch_server(smollm2_path: Path) -> Callable[..., ServerURL]:
    """``launch_server(log_path, env=None, **flags)``: a server the test stops itself (e.g. with a
    signal, to check shutdown); same flags as ``start_server``."""

    def start(log: Path, *, env: dict | None = None, **flags: object) -> ServerURL:
        return launch(server_command(smollm2_path, flags), log, env=env)

    return start


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond`` every 50 ms until it holds; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def post_then_disconnect(url: str, path: str, body: dict, *, until: Callable[[], bool], headers: dict | None = None, timeout: float = 60.0) -> bytes:
    """POST ``body`` as JSON on a raw socket, wait until ``until()`` holds (e.g. the server runs
    the request), then close the socket as a client that gave up would; returns whatever the
    server had answered by then (b"" for a request still running)."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json", f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        wait_until(until, timeout, "the server to run the request")
        s.setblocking(False)
        try:
            return s.recv(65536)
        except BlockingIOError:
            return b""


@pytest.fixture(scope="session")
def disconnecting_client() -> Callable[..., bytes]:
    """``post_then_disconnect(url, path, body, until=..., headers=None)``: a raw-socket client
    that sends a request and hangs up before the answer (see :func:`post_then_disconnect`)."""
    return post_then_disconnect
