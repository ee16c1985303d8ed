"""Fixtures for the data tests: isolated cache/env, real shared data, a local HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

# Read before any fixture clears the variable: tests use the real data from here.
_ENV_DATA = os.environ.get("MLSYSKIT_DATA_DIR", "").strip()
SHARED_DATA = Path(_ENV_DATA) if _ENV_DATA else Path(__file__).parents[3] / "shared" / "data"

_ENV_VARS = (
    "MLSYSKIT_DATA_DIR",
    "MLSYSKIT_CACHE_DIR",
    "MLSYSKIT_MNIST_MIRRORS",
    "MLSYSKIT_SHAKESPEARE_URLS",
    "XDG_CACHE_HOME",
)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the user's data dir or cache; the cache is a fresh tmp dir."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLSYSKIT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shared_data() -> Path:
    """The project's real data dir; skips the test where it is absent."""
    if not all((SHARED_DATA / sub).is_dir() for sub in ("mnist", "shakespeare")):
        pytest.skip(f"shared data not found at {SHARED_DATA} (set MLSYSKIT_DATA_DIR)")
    return SHARED_DATA


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in IDX format (big-endian, as the spec says)."""
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """Write array as an IDX file, gzip'd with a fixed mtime so checksums are reproducible."""
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_mnist(directory: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict:
    """Small MNIST-shaped gzip IDX files in directory; returns {file name: md5}."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
    }
    return {name: md5(write_idx(directory / name, a)) for name, a in arrays.items()}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; paths under /short/ announce 1000 more bytes than they send."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/short/"):
            body = (Path(self.directory) / self.path.removeprefix("/short/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A real HTTP server on 127.0.0.1: (base URL, directory it serves, request paths)."""
    root = tmp_path / "www"
    root.mkdir()
    handler: Callable = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.hits = []  # type: ignore[attr-defined]
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root, server.hits  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# Helpers reach the tests as fixtures: importing from conftest breaks under some import modes.
@pytest.fixture
def make_idx() -> Callable[..., Path]:
    return write_idx


@pytest.fixture
def make_fake_mnist() -> Callable[..., dict]:
    return fake_mnist


@pytest.fixture
def md5sum() -> Callable[[Path], str]:
    return md5
