"""The torch.distributed transport: `fl launch --transport torchdist` starts real ranks (gloo on
127.0.0.1); rank 0 runs the same round loop and follows the simulation's trajectory."""

import json
import subprocess
import sys

import pytest

from mlsyskit.fl import FLConfig, run

FLAGS = ["--dataset", "mnist-5k", "--model", "logreg", "--clients", "3", "--fraction", "1", "--local-epochs", "1",
         "--batch-size", "50", "--lr", "0.1", "--rounds", "2"]


def _mlsyskit(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "mlsyskit", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_ranks_follow_the_simulation_trajectory(tmp_path, data_dir):
    data = ["--data-dir", data_dir] if data_dir else []
    # 3 clients on 2 client ranks: one rank trains two clients, the other one (a padded row)
    done = _mlsyskit("fl", "launch", "--transport", "torchdist", "--ranks", 3, *FLAGS, *data, "--out", tmp_path / "ranks", "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ranks = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", clients=3,
                   fraction=1.0, local_epochs=1, batch_size=50, lr=0.1, rounds=2, out=str(tmp_path / "sim"))
    sim = run(cfg, progress=False)
    simulated = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip(ranks, simulated, strict=True):
        assert d["clients"] == 3 and d["dropped"] == [] and d["rejected"] == []
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-4)
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        # payloads of the collectives: 2 ranks x 2 rows of (id, loss, model) up; header + model down
        assert d["bytes_up"] == 2 * 2 * (sim["parameters"] + 2) * 4
        assert d["bytes_down"] == 2 * (5 * 8 + 4 * sim["parameters"])
    assert summary["final_accuracy"] == pytest.approx(sim["final_accuracy"], abs=2e-3)
    assert (tmp_path / "ranks" / "model.safetensors").stat().st_size > 0


def test_collective_refuses_what_it_cannot_do(tmp_path):
    done = _mlsyskit("fl", "collective", *FLAGS, "--out", tmp_path / "x", timeout=60)
    assert done.returncode == 2 and "torchrun" in done.stderr and "Traceback" not in done.stderr
    done = _mlsyskit("fl", "launch", "--transport", "torchdist", *FLAGS, "--secagg", "--out", tmp_path / "y", timeout=120)
    assert done.returncode == 2 and "gRPC transport" in done.stderr and "Traceback" not in done.stderr
