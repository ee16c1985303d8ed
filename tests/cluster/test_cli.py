"""`mlsyskit cluster simulate|report`: the JSON interface, outputs, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlsyskit.cli import main
from mlsyskit.cluster.metrics import SUMMARY_KEYS


def test_simulate_prints_the_issue_keys_on_its_last_line(q11_path, capsys) -> None:
    assert main(["cluster", "simulate", str(q11_path), "--policy", "length-class", "--rate", "1.5", "--requests", "300",
                 "--seed", "2", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    obj = json.loads(last)
    assert list(obj) == list(SUMMARY_KEYS)
    assert obj["policy"] == "length-class" and obj["rate"] == 1.5 and obj["requests"] == 300
    assert 0 < obj["completed"] <= 300 and obj["sim_wall_s"] > 0


def test_simulate_all_policies_and_outputs(q11_path, tmp_path, capsys) -> None:
    assert main(["cluster", "simulate", str(q11_path), "--policy", "all", "--rate", "1", "--requests", "120",
                 "--lengths", "unknown"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [r["policy"] for r in runs]
    assert names == ["random", "round-robin", "jsq", "lot", "length-class", "best-fit", "oracle", "predict", "predict-norecover"]
    out = tmp_path / "run"
    assert main(["cluster", "simulate", str(q11_path), "--policy", "predict", "--rate", "1", "--requests", "120",
                 "--lengths", "unknown", "--out", str(out)]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one == runs[7] | {"sim_wall_s": one["sim_wall_s"]}  # the same run alone
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary["runs"]] == ["predict"] and summary["runs"][0]["lengths"] == "unknown"
    rows = (out / "requests_predict.csv").read_text().splitlines()
    assert rows[0].startswith("id,class,arrival_s") and len(rows) == 121
    assert (out / "timeline_predict.png").stat().st_size > 1000
    tl = json.loads((out / "timeline_predict.json").read_text())
    assert set(tl) == {"c1", "c2", "c3", "c4-tp2"}


def test_report_small(q11_path, tmp_path, capsys) -> None:
    out = tmp_path / "rep.json"
    assert main(["cluster", "report", str(q11_path), "--rates", "0.5,2", "--requests", "100", "--speed-requests", "300",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "output lengths known" in text and "output lengths unknown" in text
    rep = json.loads(out.read_text())
    assert {r["policy"] for r in rep["known_lengths"]} >= {"round-robin", "length-class", "oracle"}
    assert {r["policy"] for r in rep["unknown_lengths"]} >= {"lot", "predict", "oracle"}
    assert "known_lengths" in rep["goals"] and "unknown_lengths" in rep["goals"]
    assert rep["speed_100k"]["lot"]["requests"] == 300
    assert out.with_suffix(".png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cluster", "simulate", "/nonexistent/spec.toml"], "does not exist"),
        (["cluster", "simulate", "SPEC", "--policy", "fastest"], "unknown policy"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, q11_path) -> None:
    argv = [str(q11_path) if a == "SPEC" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "mlsyskit", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("mlsyskit cluster: error:")


def test_bad_flag_values_exit_2(q11_path) -> None:
    for argv in (["--rate", "0"], ["--requests", "-3"], ["--lengths", "maybe"]):
        with pytest.raises(SystemExit) as e:
            main(["cluster", "simulate", str(q11_path), *argv])
        assert e.value.code == 2


def test_bad_spec_file(tmp_path, capsys) -> None:
    bad = tmp_path / "s.toml"
    bad.write_text("[model]\nn_layers = 2\n")
    assert main(["cluster", "simulate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlsyskit cluster: error:") and "s.toml" in err and "\n" not in err
