"""Tiny Shakespeare as a federated next-character dataset with one client per role.

Construction (as in LEAF and McMahan et al. 2017): a line ending in ':' that follows a blank
line (or starts the file) names a speaker; the lines after it, up to the next blank line, are
that speech. All speeches of one role (speaker name) are joined with newlines and cut into
non-overlapping windows of seq_len + 1 characters; a window w gives x = w[:-1], y = w[1:].
Within each role the first TRAIN_FRACTION of windows (rounded down, at least 1) are train and
the rest test: a temporal split, so test text comes later in the play than train text.

Roles with fewer than MIN_WINDOWS (= 2) windows are dropped: they cannot have both a train and
a test window. How many roles were kept and dropped is stated in `Dataset.test_source`.

The text is read from DATA_DIR/shakespeare/input.txt or DATA_DIR/input.txt, else the cache,
else downloaded (sha256-verified) from $MLSYSKIT_SHAKESPEARE_URLS (comma-separated) or
SHAKESPEARE_URL.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mlsyskit.data.dataset import Dataset
from mlsyskit.data.download import DownloadError, download_file
from mlsyskit.data.paths import DATA_DIR_ENV, default_cache_dir, first_existing, resolve_data_dir
from mlsyskit.errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
URLS_ENV = "MLSYSKIT_SHAKESPEARE_URLS"
FILE_NAME = "input.txt"

MIN_WINDOWS = 2
TRAIN_FRACTION = 0.8


def parse_speeches(text: str) -> dict[str, list[str]]:
    """Map each speaker name to its speeches, in order of the speaker's first appearance.

    Speaker lines with no speech after them are ignored, as are stray lines outside a speech.
    """
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    current: list[str] = []

    def close() -> None:
        if speaker is not None and current:
            speeches.setdefault(speaker, []).append("\n".join(current))

    after_blank = True  # the file start counts as a blank line
    for line in text.split("\n"):
        stripped = line.rstrip()
        if not stripped.strip():
            close()
            speaker, current, after_blank = None, [], True
            continue
        name = stripped[:-1].strip()
        if after_blank and stripped.endswith(":") and name:
            speaker, current = name, []
        elif speaker is not None:
            current.append(line)
        after_blank = False
    close()
    return speeches


def encode(text: str, vocab: str) -> np.ndarray:
    """Character ids (index into vocab) of text as int64; every char must be in vocab."""
    # A lookup table over code points is ~100x faster than a per-character dict lookup.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.array([ord(c) for c in vocab], dtype=np.int64)
    table = np.full(int(max(vocab_codes.max(initial=0), codes.max(initial=0))) + 1, -1, np.int64)
    table[vocab_codes] = np.arange(len(vocab_codes))
    ids = table[codes]
    if ids.size and ids.min() < 0:
        raise ValueError("text contains characters outside the vocabulary")
    return ids


def split_windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ids into non-overlapping (seq_len + 1)-windows; return (train, test) window arrays."""
    n = len(ids) // (seq_len + 1)
    windows = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    n_train = max(1, int(n * TRAIN_FRACTION))
    return windows[:n_train], windows[n_train:]


def build_char_dataset(text: str, seq_len: int, source: str) -> Dataset:
    """Per-role windows of `text` as a Dataset (name 'shakespeare'); `source` names the file."""
    if seq_len < 1:
        raise UserError(f"seq_len must be at least 1, got {seq_len}")
    speeches = parse_speeches(text)
    if not speeches:
        raise UserError(
            f"no speeches found in {source}: expected a speaker line ending in ':' after a blank "
            "line, then the speech; use the Tiny Shakespeare input.txt"
        )
    vocab = "".join(sorted(set(text)))
    names: list[str] = []
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for name, role_speeches in speeches.items():
        ids = encode("\n".join(role_speeches), vocab)
        if len(ids) // (seq_len + 1) < MIN_WINDOWS:
            continue
        train_w, test_w = split_windows(ids, seq_len)
        names.append(name)
        train_parts.append(train_w)
        test_parts.append(test_w)
    dropped = len(speeches) - len(names)
    if not names:
        raise UserError(
            f"seq_len {seq_len} is too long for {source}: no role has {MIN_WINDOWS} windows of "
            f"{seq_len + 1} characters; use a smaller seq_len"
        )
    sizes = np.array([len(w) for w in train_parts])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    natural = [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in range(len(names))]
    train = torch.from_numpy(np.concatenate(train_parts))
    test = torch.from_numpy(np.concatenate(test_parts))
    return Dataset(
        name="shakespeare",
        task="char",
        train_x=train[:, :-1].contiguous(),
        train_y=train[:, 1:].contiguous(),
        test_x=test[:, :-1].contiguous(),
        test_y=test[:, 1:].contiguous(),
        num_classes=len(vocab),
        test_source=(
            f"last {1 - TRAIN_FRACTION:.0%} of each role's {seq_len + 1}-char windows "
            f"({len(test):,} windows, temporal split as in LEAF) of {source}; "
            f"{len(names)} roles kept, {dropped} with fewer than {MIN_WINDOWS} windows dropped"
        ),
        natural_clients=natural,
        client_names=names,
        vocab=vocab,
    )


def shakespeare_urls() -> list[str]:
    """Download URLs: $MLSYSKIT_SHAKESPEARE_URLS (comma-separated) or SHAKESPEARE_URL."""
    env = os.environ.get(URLS_ENV, "")
    return [u.strip() for u in env.split(",") if u.strip()] or [SHAKESPEARE_URL]


def locate_shakespeare(data_dir: Path | None, *, download_missing: bool) -> Path:
    """input.txt from the data dir or the cache, downloading it into the cache if allowed."""
    cache_dir = default_cache_dir()
    local = [data_dir / "shakespeare" / FILE_NAME, data_dir / FILE_NAME] if data_dir else []
    found = first_existing([*local, cache_dir / "shakespeare" / FILE_NAME])
    if found is not None:
        return found
    why = "it is switched off"
    if download_missing:
        try:
            return download_file(
                shakespeare_urls(),
                cache_dir / "shakespeare" / FILE_NAME,
                [SHAKESPEARE_SHA256],
                algorithm="sha256",
            )
        except DownloadError as exc:
            why = f"it failed: {exc}"
        except OSError as exc:
            why = f"it failed: cannot write to the cache: {exc}"
    raise UserError(
        f"Tiny Shakespeare ({FILE_NAME}) not found. Provide it in one of three ways: "
        f"(1) --data-dir DIR or {DATA_DIR_ENV}=DIR where DIR/shakespeare/{FILE_NAME} is the file; "
        f"(2) put it in the cache dir as {cache_dir / 'shakespeare' / FILE_NAME}; "
        f"(3) allow the download, which needs network access to {', '.join(shakespeare_urls())} ({why})"
    )


def load_shakespeare(
    data_dir: str | Path | None = None, *, download: bool = True, seq_len: int = 80
) -> Dataset:
    """Tiny Shakespeare, one natural client per role (see the module docstring)."""
    if seq_len < 1:
        raise UserError(f"seq_len must be at least 1, got {seq_len}")
    path = locate_shakespeare(resolve_data_dir(data_dir), download_missing=download)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text ({exc}); replace the file") from exc
    text = text.replace("\r\n", "\n")
    return build_char_dataset(text, seq_len, f"Tiny Shakespeare from {path}")
