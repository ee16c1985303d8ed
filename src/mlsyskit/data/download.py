"""One atomic, checksum-verified downloader with mirror fallback, used for every dataset.

A file only ever appears at its final path after its checksum has matched: bytes go to a
temporary file in the same directory and are moved into place with os.replace (atomic on
one file system). A checksum mismatch, a network error or Ctrl-C deletes the temporary
file, so a half-written or wrong file never poses as a good one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mlsyskit.errors import UserError

DEFAULT_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 16
USER_AGENT = "mlsyskit-data/0.1 (+urllib)"


class DownloadError(UserError):
    """Every mirror failed; the message lists why for each URL."""


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)  # integrity check, not security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_to(url: str, tmp: BinaryIO, algorithm: str, timeout: float, desc: str) -> str:
    """Stream url into the open file tmp; return the hex digest of what was written."""
    h = hashlib.new(algorithm, usedforsecurity=False)  # integrity check, not security
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        # disable=None: the bar shows on an interactive stderr and stays out of logs and CI.
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=None,
            leave=False,
        ) as bar:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                tmp.write(chunk)
                h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise OSError(f"connection closed after {received} of {total} bytes")
    return h.hexdigest()


def download_file(
    urls: Sequence[str],
    dest: str | Path,
    checksums: Collection[str],
    *,
    algorithm: str = "md5",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download the first of `urls` whose content hashes to one of `checksums` into `dest`.

    Mirrors are tried in order; a failed or mismatching one is skipped. Raises DownloadError
    (a UserError) listing each mirror's failure if none works; `dest` is then left untouched.
    """
    dest = Path(dest)
    accepted = {c.lower() for c in checksums}
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp_path = Path(tmp_name)
        moved = False
        try:
            with os.fdopen(fd, "wb") as tmp:
                digest = _fetch_to(url, tmp, algorithm, timeout, desc=dest.name)
            if digest not in accepted:
                failures.append(f"{url}: {algorithm} {digest} does not match the expected checksum")
                continue
            os.replace(tmp_path, dest)
            moved = True
            return dest
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            failures.append(f"{url}: {exc.reason}")
        except (http.client.HTTPException, OSError, ValueError) as exc:
            failures.append(f"{url}: {str(exc) or type(exc).__name__}")
        finally:
            # Also runs on KeyboardInterrupt: no partial file survives an interrupted download.
            if not moved:
                tmp_path.unlink(missing_ok=True)
    tried = "; ".join(failures) if failures else "no mirror URLs given"
    raise DownloadError(f"could not download {dest.name} ({tried})")
