"""Downloads against a real HTTP server on 127.0.0.1: checksums, mirror fallback, atomicity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mlsyskit.data import default_cache_dir, load_dataset
from mlsyskit.data import download as download_module
from mlsyskit.data import mnist as mnist_module
from mlsyskit.data import shakespeare as shakespeare_module
from mlsyskit.data.download import DownloadError, download_file
from mlsyskit.errors import UserError

PAYLOAD = b"hello mnist mirror\n" * 1000
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def _no_leftovers(directory: Path) -> None:
    assert not list(directory.glob(".*.part")), "temporary download file left behind"


def test_good_checksum_lands_in_cache(http_root, isolated_env: Path) -> None:
    base, root, hits = http_root
    (root / "good").mkdir()
    (root / "good" / "f.bin").write_bytes(PAYLOAD)
    dest = default_cache_dir() / "sub" / "f.bin"
    assert download_file([base + "good/f.bin"], dest, [PAYLOAD_MD5]) == dest
    assert dest.read_bytes() == PAYLOAD
    assert hits == ["/good/f.bin"]
    _no_leftovers(dest.parent)


def test_bad_checksum_falls_back_to_next_mirror(http_root, tmp_path: Path) -> None:
    base, root, hits = http_root
    for sub, body in (("bad", b"tampered" + PAYLOAD), ("good", PAYLOAD)):
        (root / sub).mkdir()
        (root / sub / "f.bin").write_bytes(body)
    dest = tmp_path / "out" / "f.bin"
    urls = [
        base + "missing/f.bin",
        base + "bad/f.bin",
        base + "short/good/f.bin",
        base + "good/f.bin",
    ]
    download_file(urls, dest, [PAYLOAD_MD5])
    assert dest.read_bytes() == PAYLOAD
    assert hits == ["/missing/f.bin", "/bad/f.bin", "/short/good/f.bin", "/good/f.bin"]
    _no_leftovers(dest.parent)


def test_all_mirrors_bad_leaves_no_file(http_root, tmp_path: Path) -> None:
    base, root, _ = http_root
    (root / "f.bin").write_bytes(b"wrong content")
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(DownloadError) as err:
        download_file(
            [base + "f.bin", base + "nothere.bin", base + "short/f.bin"], dest, [PAYLOAD_MD5]
        )
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert "does not match the expected checksum" in message and "HTTP 404" in message
    assert "connection closed after" in message
    assert not dest.exists()
    _no_leftovers(dest.parent)


def test_interrupted_download_leaves_no_file(http_root, tmp_path: Path, monkeypatch) -> None:
    base, root, _ = http_root
    (root / "f.bin").write_bytes(PAYLOAD)

    def interrupted(url, tmp, algorithm, timeout, desc):
        tmp.write(PAYLOAD[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "_fetch_to", interrupted)
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(KeyboardInterrupt):
        download_file([base + "f.bin"], dest, [PAYLOAD_MD5])
    assert not dest.exists()
    _no_leftovers(dest.parent)


def test_existing_file_not_replaced_by_bad_download(http_root, tmp_path: Path) -> None:
    base, root, _ = http_root
    (root / "f.bin").write_bytes(b"bad")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"previous good file")
    with pytest.raises(DownloadError):
        download_file([base + "f.bin"], dest, [PAYLOAD_MD5])
    assert dest.read_bytes() == b"previous good file"


def test_sha256_checksums(http_root, tmp_path: Path) -> None:
    base, root, _ = http_root
    (root / "f.bin").write_bytes(PAYLOAD)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    dest = download_file([base + "f.bin"], tmp_path / "f.bin", [digest.upper()], algorithm="sha256")
    assert dest.read_bytes() == PAYLOAD


def _serve_fake_mnist(http_root, make_fake_mnist, monkeypatch) -> tuple[str, list[str], dict]:
    base, root, hits = http_root
    checksums = make_fake_mnist(root / "good")
    make_fake_mnist(root / "bad", seed=1)  # same names, other bytes: checksums will not match
    monkeypatch.setattr(mnist_module, "MNIST_MD5", {k: (v,) for k, v in checksums.items()})
    monkeypatch.setenv("MLSYSKIT_MNIST_MIRRORS", f"{base}bad, {base}good/")
    return base, hits, checksums


def test_mnist_downloads_into_cache_then_works_offline(
    http_root, make_fake_mnist, md5sum, monkeypatch, tmp_path: Path, isolated_env: Path
) -> None:
    _, hits, checksums = _serve_fake_mnist(http_root, make_fake_mnist, monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    ds = load_dataset("mnist", empty)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.train_y.tolist() == [i % 10 for i in range(30)]
    cached = isolated_env / "mnist"
    assert {p.name: md5sum(p) for p in cached.iterdir()} == checksums
    assert sum(h.startswith("/bad/") for h in hits) == 4  # every file tried the bad mirror first
    assert str(cached) in ds.test_source

    hits.clear()
    again = load_dataset("mnist", empty, download=False)
    assert hits == [] and again.train_x.shape == ds.train_x.shape


def test_mnist_only_missing_files_are_downloaded(
    http_root, make_fake_mnist, make_idx, monkeypatch, tmp_path: Path
) -> None:
    _, hits, _ = _serve_fake_mnist(http_root, make_fake_mnist, monkeypatch)
    data = tmp_path / "data"
    make_idx(data / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), compress=False)
    make_idx(data / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8), compress=False)
    ds = load_dataset("mnist", data)
    assert len(ds.test_y) == 5 and len(ds.train_y) == 30
    assert not any("t10k" in h for h in hits)


def test_mnist_missing_everything_lists_three_ways(tmp_path: Path, isolated_env: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset("mnist", download=False)
    message = str(err.value)
    assert "\n" not in message
    assert "--data-dir DIR" in message and "MLSYSKIT_DATA_DIR" in message
    assert "mnist/ holds train-images-idx3-ubyte.gz" in message
    assert str(isolated_env / "mnist") in message
    assert "allow the download" in message and "switched off" in message


def test_mnist_unreachable_mirrors(monkeypatch, isolated_env: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLSYSKIT_MNIST_MIRRORS", f"http://127.0.0.1:{port}/")
    with pytest.raises(UserError) as err:
        load_dataset("mnist")
    message = str(err.value)
    assert "three ways" in message and "it failed" in message and f"127.0.0.1:{port}" in message
    assert not (isolated_env / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_mnist_corrupt_cached_file_is_reported(make_fake_mnist, isolated_env: Path) -> None:
    make_fake_mnist(isolated_env / "mnist")
    (isolated_env / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bjunk")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz is a corrupt"):
        load_dataset("mnist", download=False)


def test_shakespeare_download(http_root, monkeypatch, isolated_env: Path) -> None:
    base, root, _ = http_root
    text = "A:\nhello there, this is a speech long enough.\n\nB:\nand another one here, too.\n"
    (root / "input.txt").write_text(text)
    monkeypatch.setattr(
        shakespeare_module, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest()
    )
    monkeypatch.setenv("MLSYSKIT_SHAKESPEARE_URLS", f"{base}missing.txt,{base}input.txt")
    ds = load_dataset("shakespeare", seq_len=4)
    assert (isolated_env / "shakespeare" / "input.txt").read_text() == text
    assert ds.client_names == ["A", "B"]


def test_shakespeare_missing_lists_three_ways(isolated_env: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset("shakespeare", download=False)
    message = str(err.value)
    assert "three ways" in message and "shakespeare/input.txt" in message
    assert str(isolated_env / "shakespeare" / "input.txt") in message


def test_default_mirrors_and_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLSYSKIT_MNIST_MIRRORS", raising=False)
    assert mnist_module.mnist_mirrors()[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    monkeypatch.delenv("MLSYSKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mlsyskit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mlsyskit"


def test_shared_t10k_checksums_are_accepted(shared_data: Path, md5sum) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert md5sum(shared_data / "mnist" / name) in mnist_module.MNIST_MD5[name]
