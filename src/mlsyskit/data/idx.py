"""Reader for the IDX format that MNIST ships in (http://yann.lecun.com/exdb/mnist/).

Layout: 2 zero bytes, a type byte, a dimension count, one big-endian uint32 per dimension,
then the payload in row-major order. Files may be gzip-compressed (detected by content).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from mlsyskit.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_bytes(path: Path) -> bytes:
    """File contents, gunzipped if the file starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}; check the path") from exc
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(
            f"{path} is a corrupt or truncated gzip file ({exc}); delete it and download it again"
        ) from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a writable, native-endian numpy array.

    Any malformed file raises UserError naming the file and what is wrong with it.
    """
    path = Path(path)
    data = read_bytes(path)
    fix = "delete it and download it again"
    if len(data) < 4:
        raise UserError(f"{path} is not an IDX file: only {len(data)} bytes, no header; {fix}")
    zero, type_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in IDX_DTYPES or ndim == 0:
        raise UserError(
            f"{path} is not an IDX file: magic number 0x{data[:4].hex()} "
            f"(expected 0x0000TTNN, TT a type code such as 08=uint8, NN>0 dimensions); {fix}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UserError(
            f"{path} is truncated: header needs {header_len} bytes for {ndim} dimensions, "
            f"file has {len(data)}; {fix}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise UserError(
            f"{path} is truncated: dims {'x'.join(map(str, shape))} need {expected} data bytes, "
            f"found {actual}; {fix}"
        )
    if actual > expected:
        raise UserError(
            f"{path} is corrupt: {actual - expected} extra bytes after the "
            f"{'x'.join(map(str, shape))} data; {fix}"
        )
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # astype copies: callers get a writable array in native byte order (torch needs both).
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
