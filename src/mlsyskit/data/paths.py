"""Where data is looked for: the user's data dir and the download cache."""

from __future__ import annotations

import os
from pathlib import Path

from mlsyskit.errors import UserError

DATA_DIR_ENV = "MLSYSKIT_DATA_DIR"
CACHE_DIR_ENV = "MLSYSKIT_CACHE_DIR"


def _env_path(name: str) -> Path | None:
    # An empty variable counts as unset, so `VAR= cmd` can switch it off.
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    """Download cache: $MLSYSKIT_CACHE_DIR, else $XDG_CACHE_HOME/mlsyskit, else ~/.cache/mlsyskit."""
    explicit = _env_path(CACHE_DIR_ENV)
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME")
    if xdg is not None:
        return xdg / "mlsyskit"
    return Path.home() / ".cache" / "mlsyskit"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data dir to search: the argument, else $MLSYSKIT_DATA_DIR, else None.

    A directory that was asked for but does not exist is a user error, not a silent fallback
    to downloading: a typo in --data-dir should not cost a 10 MB download.
    """
    if data_dir is not None and str(data_dir).strip():
        path, origin = Path(data_dir).expanduser(), "--data-dir"
    else:
        path, origin = _env_path(DATA_DIR_ENV), DATA_DIR_ENV
    if path is None:
        return None
    if not path.is_dir():
        raise UserError(
            f"data dir {path} (from {origin}) does not exist or is not a directory; "
            "fix the path or leave it unset to use the cache dir"
        )
    return path


def first_existing(candidates: list[Path]) -> Path | None:
    """The first candidate that is a file, or None."""
    for path in candidates:
        if path.is_file():
            return path
    return None
