import json

import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.fl import rundir


def test_checkpoint_round_trip_and_missing(tmp_path):
    assert rundir.load_checkpoint(tmp_path)[0] == 0
    w = torch.arange(5, dtype=torch.float32)
    rundir.save_checkpoint(tmp_path, 7, w, {"m": torch.ones(5)})
    rnd, got, state = rundir.load_checkpoint(tmp_path)
    assert rnd == 7 and torch.equal(got, w) and torch.equal(state["m"], torch.ones(5))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / rundir.CHECKPOINT).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unreadable"):
        rundir.load_checkpoint(tmp_path)


def test_metrics_ignore_a_torn_last_line_and_truncate(tmp_path):
    for r in (1, 2, 3):
        rundir.append_metrics(tmp_path, {"round": r})
    with open(tmp_path / rundir.METRICS, "a") as f:
        f.write('{"round": 4, "test_acc')  # killed mid-write
    assert [r["round"] for r in rundir.read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["round"] for r in rundir.read_metrics(tmp_path, upto_round=2)] == [1, 2]


def test_new_run_dir_refuses_an_existing_run(tmp_path):
    rundir.new_run_dir(tmp_path / "a")
    rundir.write_json(tmp_path / "a" / rundir.CONFIG, {"x": 1})
    with pytest.raises(UserError, match="already holds a run"):
        rundir.new_run_dir(tmp_path / "a")
    assert json.loads((tmp_path / "a" / rundir.CONFIG).read_text()) == {"x": 1}


def _strict_json(text):
    """json.loads that refuses NaN/Infinity, as strict parsers (JavaScript, jq, Go) do."""
    def bad(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    row = {"round": 1, "test_loss": float("nan"), "train_loss": float("inf"), "x": [float("-inf"), 2.5]}
    rundir.write_json(tmp_path / "s.json", row)
    rundir.append_metrics(tmp_path, row)
    rundir.rewrite_metrics(tmp_path, [row, row])
    want = {"round": 1, "test_loss": None, "train_loss": None, "x": [None, 2.5]}
    assert _strict_json((tmp_path / "s.json").read_text()) == want
    assert [_strict_json(line) for line in (tmp_path / rundir.METRICS).read_text().splitlines()] == [want, want]


def test_accuracy_plot_has_whole_round_ticks():
    rows = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.7}]
    fig = rundir.accuracy_figure(rows, "two rounds")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
