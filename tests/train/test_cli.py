"""`mlsyskit train` from the command line: outputs, precisions, the profiler trace, the Slurm
script, the character transformer, and one-line errors for bad input."""

import json
import shlex
import subprocess

import pytest

from mlsyskit.cli import build_parser, main
from mlsyskit.train import TrainConfig, train

QUICK = ["--dataset", "synthetic", "--hidden", "32", "--train-limit", "256", "--test-limit", "128",
         "--batch-size", "32", "--no-progress"]


def test_cli_writes_the_run_directory_and_prints_json_last(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--target-accuracy", "0.5", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["epochs_run"] == 2 and result["steps"] == 16 and result["world_size"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "samples_per_s",
                            "peak_mem_mb", "world_size"}
    assert [r["step"] for r in rows] == [8, 16] and all(r["peak_mem_mb"] > 10 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["test_accuracy"] > 0.5
    assert summary["time_to_target_s"] == rows[0]["elapsed_s"]  # epoch 1 already passes 0.5
    assert json.loads((out / "config.json").read_text())["config"]["hidden"] == "32"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_learns(tmp_path, precision):
    s = train(TrainConfig(dataset="synthetic", hidden="64", train_limit=512, test_limit=256, batch_size=32,
                          precision=precision, out=str(tmp_path / precision)))
    assert s["final_accuracy"] > 0.8 and s["precision"] == precision


def test_profile_writes_a_chrome_trace(tmp_path):
    train(TrainConfig(dataset="synthetic", hidden="32", train_limit=256, test_limit=64, batch_size=32,
                      profile=True, profile_steps=2, out=str(tmp_path / "p")))
    trace = json.loads((tmp_path / "p" / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "train_step" in names and "aten::addmm" in names
    assert sum(e.get("name") == "train_step" for e in trace["traceEvents"]) == 2


def test_char_transformer_on_shakespeare(tmp_path, data_dir):
    if data_dir is None:
        pytest.skip("Tiny Shakespeare is not on this machine (../shared/data or MLSYSKIT_DATA_DIR)")
    s = train(TrainConfig(dataset="shakespeare", data_dir=str(data_dir), seq_len=32, train_limit=256,
                          test_limit=64, batch_size=32, optimizer="adam", lr=3e-3, epochs=1, out=str(tmp_path / "c")))
    assert s["model"] == "transformer" and s["steps"] == 8
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["test_loss"] < 4.0  # uniform over ~65 characters is 4.17 nats


def test_slurm_script_reproduces_the_run(tmp_path, capsys):
    script = tmp_path / "job.sbatch"
    argv = ["train", "--dataset", "mnist-5k", "--model", "mlp", "--epochs", "3", "--batch-size", "256",
            "--grad-accum", "2", "--precision", "bf16", "--no-sync-bn", "--out", "runs/my run",
            "--slurm-script", str(script), "--slurm-nodes", "2", "--slurm-nproc-per-node", "4",
            "--slurm-gpus-per-node", "4", "--slurm-time", "02:00:00", "--slurm-port", "29555"]
    assert main(argv) == 0
    assert "sbatch" in capsys.readouterr().out
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    sbatch = {line.split("=")[0].split()[1]: line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")}
    assert sbatch["--nodes"] == "2" and sbatch["--gpus-per-node"] == "4" and sbatch["--time"] == "02:00:00"
    assert sbatch["--ntasks-per-node"] == "1"  # one torchrun agent per node
    command = shlex.split(text.split("srun", 1)[1].replace("\\\n", " "))
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[command.index("--nnodes") + 1] == "$SLURM_NNODES"
    assert command[command.index("--rdzv-endpoint") + 1] == "$head_node:29555"
    assert command[command.index("--rdzv-backend") + 1] == "c10d"
    train_argv = command[command.index("mlsyskit") + 1:]
    args = build_parser().parse_args(train_argv)
    assert (args.model, args.epochs, args.batch_size, args.grad_accum, args.precision, args.sync_bn, args.out) == \
        ("mlp", 3, 256, 2, "bf16", False, "runs/my run")
    assert args.slurm_script is None  # the job trains; it does not write another script


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--model", "mlp", "--dataset", "synthetic"], "takes 28x28 grayscale digits"),
        (["--model", "transformer"], "reads characters"),
        (["--batch-size", "30", "--grad-accum", "4"], "must be a multiple of world size x --grad-accum = 1 x 4"),
        (["--batch-size", "999999"], "larger than the training set"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--hidden", "64,x"], "--hidden '64,x'"),
        (["--backend", "nccl", "--device", "cuda"], "torch sees no CUDA GPU"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    base = ["train", "--dataset", "synthetic", "--no-progress", "--out", str(tmp_path / "x")]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mlsyskit train: error:")


def test_resume_refuses_changes_and_existing_runs_are_kept(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", *QUICK, "--max-steps", "3", "--out", out]) == 0
    before = (tmp_path / "r" / "config.json").read_text()
    assert main(["train", *QUICK, "--out", out]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert (tmp_path / "r" / "config.json").read_text() == before
    assert main(["train", "--resume", out, "--lr", "0.5", "--no-progress"]) == 2
    assert "--lr 0.5 differs from the run being resumed" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "is missing" in capsys.readouterr().err
    assert main(["train", "--resume", out, "--epochs", "2", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 16
