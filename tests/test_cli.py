import os
import subprocess
import sys

import pytest

from mlsyskit.cli import build_parser, main


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlsyskit.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_help_lists_subcommands():
    out = _cli("--help")
    assert out.returncode == 0 and "fedavg" in out.stdout


def test_fedavg_help_documents_every_flag_with_default():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["fedavg"].format_help().split())
    for flag in ("--dataset", "--data-dir", "--model", "--clients", "--partition", "--alpha", "--fraction",
                 "--local-epochs", "--batch-size", "--lr", "--rounds", "--strategy", "--mu", "--malicious",
                 "--attack", "--dropout", "--seed", "--target-accuracy", "--out", "--resume"):
        assert flag in text, flag
    assert "(default: 0.1)" in text and "(default: mnist-5k)" in text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--fraction", "0"], "--fraction must be in (0, 1]"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
        (["--lr", "-0.1"], "--lr must be positive"),
        (["--clients", "6000"], "exceeds"),
        (["--batch-size", "ten"], "invalid batch size"),
        (["--strategy", "fedmagic"], "unknown strategy"),
        (["--dataset", "cifar"], "unknown dataset"),
        (["--dataset", "shakespeare", "--model", "cnn"], "does not fit dataset"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--resume", "/nonexistent/run"], "no config.json"),
        (["--out", "/proc/version/run"], "cannot write the run directory"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["fedavg", "--quiet", "--out", str(tmp_path / "r"), *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_data_is_one_line_exit_2_in_a_real_process(tmp_path):
    out = _cli(
        "fedavg", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--quiet",
        env={"MLSYSKIT_CACHE_DIR": str(tmp_path / "cache"), "MLSYSKIT_MNIST_MIRRORS": "http://127.0.0.1:9/"},
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_existing_run_is_never_overwritten(tmp_path, data_dir):
    args = ["fedavg", "--quiet", "--model", "logreg", "--rounds", "1", "--clients", "10", "--out", str(tmp_path / "r")]
    if data_dir:
        args += ["--data-dir", str(data_dir)]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    assert "outputs in" in first.stdout
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    second = _cli(*args)
    assert second.returncode == 2 and "--resume" in second.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_killed_run_resumes_on_the_same_trajectory(tmp_path, data_dir):
    """SIGKILL a real run mid-way, --resume it, compare with an uninterrupted run."""
    import json
    import signal
    import time

    args = ["fedavg", "--quiet", "--model", "logreg", "--clients", "20", "--fraction", "0.5", "--rounds", "60"]
    if data_dir:
        args += ["--data-dir", str(data_dir)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mlsyskit.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count("\n")
    assert 5 <= done < 60, "the run should have been killed part-way"
    resumed = _cli(*args, "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    full = _cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    def rows(p):
        drop = ("wall_s", "train_s")
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(p / "metrics.jsonl")]

    assert rows(killed) == rows(tmp_path / "full")
    assert len(rows(killed)) == 60


def test_resume_refuses_a_changed_flag(tmp_path, data_dir, capsys):
    args = ["fedavg", "--quiet", "--model", "logreg", "--rounds", "1", "--clients", "10", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    for extra, flag in ((["--batch-size", "full"], "--batch-size"), (["--lr", "0.3"], "--lr")):
        assert main(["fedavg", "--quiet", "--resume", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert flag in err and "cannot change" in err
    assert main(["fedavg", "--quiet", "--resume", str(tmp_path / "r"), "--rounds", "2"]) == 0


def test_ctrl_c_is_one_line_and_leaves_a_resumable_run(tmp_path, data_dir):
    import signal
    import time

    args = ["fedavg", "--quiet", "--model", "logreg", "--clients", "10", "--rounds", "500", "--out", str(tmp_path / "r")]
    if data_dir:
        args += ["--data-dir", str(data_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "mlsyskit.cli", *args], stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    resumed = _cli("fedavg", "--quiet", "--resume", str(tmp_path / "r"), "--rounds", "5")
    assert resumed.returncode == 0, resumed.stderr
