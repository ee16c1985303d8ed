"""Every index kind by the name its file records, and :func:`load_index` to read any of them.

It sits above :mod:`~mlsyskit.vector.ivf` and :mod:`~mlsyskit.vector.ivfpq` (which builds on
IVF), so neither imports the other back.
"""

from __future__ import annotations

from pathlib import Path

from mlsyskit.errors import UserError
from mlsyskit.vector.index_io import read_index
from mlsyskit.vector.ivf import IVFIndex, from_meta
from mlsyskit.vector.ivfpq import IVFPQIndex

INDEX_KINDS: dict[str, type[IVFIndex]] = {IVFIndex.kind: IVFIndex, IVFPQIndex.kind: IVFPQIndex}


def load_index(path: str | Path, backend: str = "torch") -> IVFIndex:
    """Read any index written by `save` (IVFFlat or IVFPQ), whichever kind the file holds."""
    kind, meta, arrays = read_index(path)
    cls = INDEX_KINDS.get(kind)
    if cls is None:
        raise UserError(f"index file {path} holds an unknown index kind {kind!r}")
    index = from_meta(cls, path, meta, backend)
    index._restore(path, arrays)
    return index
