"""The index file format: a JSON header and raw little-endian arrays, no pickle.

Layout of a file (all integers little-endian):

    bytes 0..7    magic b"MLSKVEC1"
    bytes 8..15   uint64 H: length of the header
    bytes 16..    H bytes of UTF-8 JSON, the header:
                    {"format": "mlsyskit-vector-index", "version": 1, "kind": "IVFFlat" | "IVFPQ",
                     "meta": {...index parameters...},
                     "arrays": {name: {"dtype": "<f4" | "<i8" | "|u1", "shape": [...],
                                       "offset": absolute byte offset, "nbytes": n,
                                       "crc32": zlib.crc32 of the bytes}}}
    then each array's bytes in C order at its offset (offsets are 64-byte aligned).

Reading checks the magic, the header, every array's dtype, bounds and CRC-32; any mismatch
is a UserError naming the file, never a crash or silently wrong results.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mlsyskit.errors import UserError

MAGIC = b"MLSKVEC1"
FORMAT = "mlsyskit-vector-index"
VERSION = 1
ALIGN = 64
_ALLOWED_DTYPES = {"<f4", "<i8", "|u1"}
_MAX_HEADER = 1 << 24


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_index(path: str | Path, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` and `meta` to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        if a.dtype.str not in _ALLOWED_DTYPES:
            raise ValueError(f"array {name} has unsupported dtype {a.dtype}")
    specs: dict[str, dict[str, Any]] = {}
    for name, a in arrays.items():
        specs[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": 0,
                       "nbytes": int(a.nbytes), "crc32": zlib.crc32(memoryview(a).cast("B"))}
    # The offsets depend on the header length, which depends on the offsets: fix the header
    # size by padding the offset digits to a fixed width first.
    def header_bytes() -> bytes:
        return json.dumps({"format": FORMAT, "version": VERSION, "kind": kind, "meta": meta,
                           "arrays": specs}).encode()

    for spec in specs.values():
        spec["offset"] = 10**15  # widest offset we write: reserve its digits
    start = _align(16 + len(header_bytes()))
    pos = start
    for spec in specs.values():
        spec["offset"] = pos
        pos = _align(pos + spec["nbytes"])
    header = header_bytes()
    header += b" " * (start - 16 - len(header))  # JSON allows trailing whitespace
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for name, spec in specs.items():
                f.seek(spec["offset"])
                f.write(memoryview(arrays[name]).cast("B"))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write index file {path}: {e.strerror or e}") from None


def read_index(path: str | Path) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """(kind, meta, arrays) of an index file; UserError if it is missing, not ours or corrupt."""
    path = Path(path)

    def corrupt(why: str) -> UserError:
        return UserError(f"index file {path} is corrupt or not an mlsyskit index: {why}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise corrupt("bad magic bytes")
            (hlen,) = struct.unpack("<Q", head[8:])
            if hlen > min(_MAX_HEADER, size - 16):
                raise corrupt(f"header length {hlen} does not fit the file")
            try:
                header = json.loads(f.read(hlen).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise corrupt(f"unreadable header ({e})") from None
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise corrupt("wrong format name")
            if header.get("version") != VERSION:
                raise corrupt(f"unsupported version {header.get('version')!r} (this reads {VERSION})")
            specs, meta, kind = header.get("arrays"), header.get("meta"), header.get("kind")
            if not isinstance(specs, dict) or not isinstance(meta, dict) or not isinstance(kind, str):
                raise corrupt("header lacks kind, meta or arrays")
            arrays = {}
            for name, spec in specs.items():
                arrays[name] = _read_array(f, name, spec, size, corrupt)
    except FileNotFoundError:
        raise UserError(f"index file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"index path {path} is a directory, not an index file") from None
    except OSError as e:
        raise UserError(f"cannot read index file {path}: {e.strerror or e}") from None
    return kind, meta, arrays


def _read_array(f, name: str, spec: Any, size: int, corrupt) -> np.ndarray:
    try:
        dtype, shape = np.dtype(spec["dtype"]), tuple(int(s) for s in spec["shape"])
        offset, nbytes, crc = int(spec["offset"]), int(spec["nbytes"]), int(spec["crc32"])
    except (TypeError, KeyError, ValueError) as e:
        raise corrupt(f"bad entry for array {name} ({e})") from None
    if spec["dtype"] not in _ALLOWED_DTYPES or any(s < 0 for s in shape):
        raise corrupt(f"array {name} has dtype {spec['dtype']!r} and shape {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != nbytes or offset < 16 or offset + nbytes > size:
        raise corrupt(f"array {name} ({nbytes} bytes at {offset}) does not fit the file")
    f.seek(offset)
    arr = np.fromfile(f, dtype=dtype, count=count)
    if arr.size != count or zlib.crc32(memoryview(arr).cast("B")) != crc:
        raise corrupt(f"array {name} fails its CRC-32 check")
    return arr.reshape(shape)
