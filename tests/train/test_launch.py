"""`mlsyskit train` as people launch it: two torchrun agents ("nodes") meeting at a c10d
rendezvous on 127.0.0.1, and a run stopped with Ctrl-C that resumes to the same end."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from mlsyskit.train import TrainConfig, train

FFN = dict(dataset="synthetic", model="ffn", hidden="64,64", train_limit=1024, test_limit=512,
           batch_size=64, lr=0.05, epochs=1)


def _argv(kw: dict) -> list[str]:
    return [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_two_nodes_at_a_c10d_rendezvous_equal_one_process(tmp_path, compare):
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`
    started twice, as on two machines: world size 2, and the weights of one process."""
    one = train(TrainConfig(**FFN, out=str(tmp_path / "one")))
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mlsyskit-test",
           "-m", "mlsyskit", "train", *_argv(FFN), "--out", str(tmp_path / "two"), "--no-progress"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in nodes]
    for p, (out, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    reports = [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["world_size"] == 2  # rank 0 (on one node) reports
    assert reports[0]["steps"] == one["steps"]
    assert compare.max_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_ends_like_an_uninterrupted_run(tmp_path, compare):
    kw = dict(FFN, epochs=40, checkpoint_every=4)
    whole = train(TrainConfig(**kw, out=str(tmp_path / "whole")))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlsyskit", "train", *_argv(kw), "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; the last checkpoint is kept (--resume DIR continues)" in err and "Traceback" not in err
    assert (run / "checkpoint.safetensors").exists() and not (run / "summary.json").exists()
    r = subprocess.run([sys.executable, "-m", "mlsyskit", "train", "--resume", str(run), "--no-progress"],
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert done["complete"] and done["steps"] == whole["steps"]
    assert compare.max_diff(tmp_path / "whole", run) < 1e-5
