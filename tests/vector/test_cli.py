import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlsyskit.cli import build_parser, main


def _files(tmp_path, n=800, d=8):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d)).astype(np.float32)
    np.save(tmp_path / "base.npy", base)
    np.save(tmp_path / "q.npy", base[:3] + 0.01)
    return base


def test_build_then_search_prints_json_lines(tmp_path, capsys):
    base = _files(tmp_path)
    idx = str(tmp_path / "ix")
    assert main(["vector", "build", "--base", str(tmp_path / "base.npy"), "--out", idx, "--nlist", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ntotal"] == 800 and summary["nlist"] == 8
    assert main(["vector", "search", "--index", idx, "--queries", str(tmp_path / "q.npy"), "--k", "4", "--nprobe", "8"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["ids"][0] for x in lines] == [0, 1, 2] and all(len(x["ids"]) == 4 for x in lines)
    out = tmp_path / "ids.npy"
    assert main(["vector", "search", "--base", str(tmp_path / "base.npy"), "--queries", str(tmp_path / "q.npy"),
                 "--k", "5", "--metric", "cosine", "--out", str(out), "--distances-out", str(tmp_path / "d.npy")]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == str(out)
    ids = np.load(out)
    assert ids.shape == (3, 5) and ids[:, 0].tolist() == [0, 1, 2]
    assert np.load(tmp_path / "d.npy").shape == (3, 5)
    assert base.shape == (800, 8)
    pq = str(tmp_path / "pq")
    assert main(["vector", "build", "--base", str(tmp_path / "base.npy"), "--out", pq, "--nlist", "4",
                 "--pq", "4", "--pq-bits", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "IVFPQ"
    assert main(["vector", "search", "--index", pq, "--queries", str(tmp_path / "q.npy"), "--k", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.parametrize("setup, args, needle", [
    (lambda p: np.save(p / "bad.npy", np.ones((3, 5), np.float32)),
     ["search", "--index", "{ix}", "--queries", "{p}/bad.npy"], "have 5 columns but the index holds d=8"),
    (lambda p: np.save(p / "bad.npy", np.ones((3, 8), complex)),
     ["search", "--index", "{ix}", "--queries", "{p}/bad.npy"], "dtype complex128"),
    (lambda p: np.save(p / "bad.npy", np.ones((3, 7), np.float32)),
     ["search", "--base", "{p}/base.npy", "--queries", "{p}/bad.npy"], "have 7 columns but the base has 8"),
    (lambda p: (p / "bad.npy").write_text("not numpy"),
     ["search", "--index", "{ix}", "--queries", "{p}/bad.npy"], "cannot read queries file"),
    (lambda p: None, ["search", "--index", "{p}/none", "--queries", "{p}/q.npy"], "does not exist"),
    (lambda p: (p / "junk").write_bytes(b"MLSKVEC1garbage"),
     ["search", "--index", "{p}/junk", "--queries", "{p}/q.npy"], "corrupt"),
    (lambda p: None, ["search", "--index", "{ix}", "--queries", "{p}/q.npy", "--k", "0"], "k must be at least 1"),
    (lambda p: None, ["search", "--index", "{ix}", "--queries", "{p}/q.npy", "--metric", "l2"], "fixed when the index is built"),
    (lambda p: None, ["build", "--base", "{p}/base.npy", "--out", "{p}/x", "--nlist", "5000"], "at least nlist=5000"),
    (lambda p: None, ["build", "--base", "{p}/base.npy", "--out", "/proc/nope/x", "--nlist", "4"], "cannot write index file"),
    (lambda p: None, ["build", "--base", "{p}/base.npy", "--out", "{p}/x", "--pq", "3"], "multiple of m=3"),
    (lambda p: None, ["build", "--base", "{p}/base.npy", "--out", "{p}/x", "--nlist", "0"], "--nlist must be at least 1, got 0"),
    (lambda p: None, ["bench", "--nlist", "-1"], "--nlist must be at least 1, got -1"),
    (lambda p: np.save(p / "empty.npy", np.zeros((0, 8), np.float32)),
     ["search", "--base", "{p}/empty.npy", "--queries", "{p}/q.npy"], "empty.npy) holds no vectors (shape (0, 8))"),
    (lambda p: np.save(p / "empty.npy", np.zeros((0, 8), np.float32)),
     ["build", "--base", "{p}/empty.npy", "--out", "{p}/x"], "holds no vectors"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, setup, args, needle):
    _files(tmp_path)
    ix = tmp_path / "ix"
    assert main(["vector", "build", "--base", str(tmp_path / "base.npy"), "--out", str(ix), "--nlist", "4"]) == 0
    setup(tmp_path)
    capsys.readouterr()
    code = main(["vector", *[a.format(p=tmp_path, ix=ix) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_bench_runs_small(capsys):
    assert main(["vector", "bench", "--n", "3000", "--d", "16", "--queries", "50", "--nprobe", "1,4",
                 "--numpy-queries", "5"]) == 0
    out = capsys.readouterr().out
    assert "torch exact" in out and "numpy exact" in out and "nprobe=4" in out


def test_help_documents_every_flag_with_its_default():
    vector = build_parser()._subparsers._group_actions[0].choices["vector"]
    actions = vector._subparsers._group_actions[0].choices
    for name, flags in {"build": ["--base", "--out", "--nlist", "--metric", "--ids", "--pq", "--pq-bits", "--max-iter", "--seed", "--backend"],
                        "search": ["--index", "--base", "--queries", "--k", "--nprobe", "--metric", "--backend", "--out", "--distances-out"],
                        "bench": ["--n", "--d", "--queries", "--k", "--clusters", "--metric", "--nlist", "--nprobe", "--numpy-queries", "--seed"]}.items():
        for action in actions[name]._actions:
            if action.option_strings and action.option_strings[0] != "-h":
                assert action.help and ("default" in action.help or "required" in action.help or action.option_strings[0] in ("--index", "--base") and name == "search"), (name, action.option_strings)
        text = actions[name].format_help()
        assert all(f in text for f in flags)


def test_cli_module_imports_nothing_heavy():
    code = "import sys, mlsyskit.vector.cli; print(sorted(m for m in ('numpy', 'torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_missing_action_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        main(["vector"])
    assert e.value.code == 2


def test_padded_results_print_valid_json(tmp_path):
    """Fewer than k vectors in the probed list: ids padded with -1, distances null (not Infinity)."""
    _files(tmp_path, n=40, d=4)
    ix = str(tmp_path / "ix")
    assert main(["vector", "build", "--base", str(tmp_path / "base.npy"), "--out", ix, "--nlist", "8"]) == 0
    run = [sys.executable, "-m", "mlsyskit.cli", "vector"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*run, "search", "--index", ix, "--queries", str(tmp_path / "q.npy"), "--k", "30",
                        "--nprobe", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr

    def strict(name):
        raise ValueError(f"invalid JSON constant {name}")

    lines = [json.loads(line, parse_constant=strict) for line in r.stdout.splitlines()]
    assert len(lines) == 3
    for line in lines:
        padded = [i for i, x in enumerate(line["ids"]) if x == -1]
        assert padded, line  # one list of 8 cannot hold 30 neighbours
        assert all(line["distances"][i] is None for i in padded)
        assert all(d is not None for i, d in enumerate(line["distances"]) if i not in padded)
