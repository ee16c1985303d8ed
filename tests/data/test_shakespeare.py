"""Tiny Shakespeare: speech parsing, per-role windows, temporal split, the real file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlsyskit.data import load_dataset, partition
from mlsyskit.data.shakespeare import MIN_WINDOWS, build_char_dataset, parse_speeches
from mlsyskit.errors import UserError

PLAY = """ALICE:
abcdefghij
klmnopqrst

BOB:
0123456789

CAROL:

ALICE:
uvwxyz: ABCDEFG
HIJ

stray line outside a speech
DAVE:
not a speaker line, no blank before it


BOB:
short
"""


def test_parse_speeches() -> None:
    speeches = parse_speeches(PLAY)
    assert list(speeches) == ["ALICE", "BOB"]  # CAROL has no speech; DAVE is not after a blank
    assert speeches["ALICE"] == ["abcdefghij\nklmnopqrst", "uvwxyz: ABCDEFG\nHIJ"]
    assert speeches["BOB"] == ["0123456789", "short"]


def test_windows_split_and_clients() -> None:
    seq_len = 4  # windows of 5 characters
    ds = build_char_dataset(PLAY, seq_len, "handmade")
    vocab = ds.vocab
    assert vocab == "".join(sorted(set(PLAY))) and ds.num_classes == len(vocab)

    alice = "abcdefghij\nklmnopqrst\nuvwxyz: ABCDEFG\nHIJ"  # 41 chars -> 8 windows, 6 train
    bob = "0123456789\nshort"  # 16 chars -> 3 windows, 2 train
    assert ds.client_names == ["ALICE", "BOB"]

    def decode(rows: torch.Tensor) -> list[str]:
        return ["".join(vocab[i] for i in row) for row in rows.tolist()]

    train_windows = [x + y[-1] for x, y in zip(decode(ds.train_x), decode(ds.train_y), strict=True)]
    test_windows = [x + y[-1] for x, y in zip(decode(ds.test_x), decode(ds.test_y), strict=True)]
    cut = lambda s: [s[i : i + 5] for i in range(0, len(s) // 5 * 5, 5)]  # noqa: E731
    assert train_windows == cut(alice)[:6] + cut(bob)[:2]
    assert test_windows == cut(alice)[6:] + cut(bob)[2:]
    assert [c.tolist() for c in ds.natural_clients] == [list(range(6)), [6, 7]]
    assert "2 roles kept, 0 with fewer than 2 windows dropped" in ds.test_source


def test_roles_with_too_few_windows_are_dropped() -> None:
    ds = build_char_dataset(PLAY, 8, "handmade")  # 9-char windows: BOB has 1, ALICE 4
    assert ds.client_names == ["ALICE"] and MIN_WINDOWS == 2
    assert "1 roles kept, 1 with fewer than 2 windows dropped" in ds.test_source
    assert len(ds.train_x) == 3 and len(ds.test_x) == 1
    with pytest.raises(UserError, match="too long"):
        build_char_dataset(PLAY, 100, "handmade")
    with pytest.raises(UserError, match="no speeches found"):
        build_char_dataset("just prose\nwithout speakers\n", 4, "prose")
    with pytest.raises(UserError, match="seq_len must be at least 1"):
        build_char_dataset(PLAY, 0, "handmade")


def test_from_data_dir_flat_layout(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(PLAY.replace("\n", "\r\n"))
    ds = load_dataset("shakespeare", tmp_path, download=False, seq_len=4)
    assert ds.client_names == ["ALICE", "BOB"] and "\r" not in ds.vocab


def test_real_shakespeare(shared_data: Path) -> None:
    ds = load_dataset("shakespeare", shared_data, download=False)
    assert ds.name == "shakespeare" and ds.task == "char"
    assert len(ds.client_names) > 100 and len(ds.natural_clients) == len(ds.client_names)
    assert ds.vocab == "".join(sorted(set((shared_data / "shakespeare" / "input.txt").read_text())))
    assert ds.num_classes == len(ds.vocab) == 65
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 80
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert 0 <= x.min() and x.max() < ds.num_classes
    # Natural clients tile train exactly, in order; each role keeps ~80% of its windows.
    covered = np.concatenate(ds.natural_clients)
    np.testing.assert_array_equal(covered, np.arange(len(ds.train_x)))
    assert 0.75 < len(ds.train_x) / (len(ds.train_x) + len(ds.test_x)) < 0.85
    assert "roles kept" in ds.test_source and "dropped" in ds.test_source
    # A role's train and test windows are different text (non-overlapping windows).
    first = ds.client_names.index("First Citizen")
    train_rows = {tuple(r) for r in ds.train_x[ds.natural_clients[first]].tolist()}
    assert len(train_rows) == len(ds.natural_clients[first])
    parts = partition(None, 10, "natural", seed=0, natural=ds.natural_clients)
    assert len(parts) == 10


def test_seq_len_changes_windows(shared_data: Path) -> None:
    ds = load_dataset("shakespeare", shared_data, download=False, seq_len=20)
    assert ds.train_x.shape[1] == 20
    with pytest.raises(UserError, match="seq_len"):
        load_dataset("shakespeare", shared_data, seq_len=0)
