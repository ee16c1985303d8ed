"""The torch.distributed transport: `fl launch --transport torchdist` starts real ranks (gloo on
127.0.0.1); rank 0 runs the same round loop and follows the simulation's trajectory, with one
weighted all_reduce for mean-based strategies and a gather for the rules that need every update.

Clients train sequentially (no vmap warm-up in every rank), and the simulation a run is compared
with runs in this process while the ranks start (each rank is a python + torch import)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mlsyskit.cli import main
from mlsyskit.fl import FLConfig, collective, run

FLAGS = ["--dataset", "mnist-5k", "--model", "logreg", "--clients", "3", "--fraction", "1", "--local-epochs", "1",
         "--batch-size", "50", "--lr", "0.1", "--rounds", "2", "--client-exec", "sequential"]
WAIT_S = 240


class Launched:
    """`mlsyskit ...` started now; `done()` waits for it (stdout and stderr as text, returncode)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "mlsyskit", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def done(self):
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=WAIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        self.returncode = self.proc.returncode
        return self


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _simulate(tmp_path, data_dir, name, **kw):
    cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", clients=3, fraction=1.0,
                   local_epochs=1, batch_size=50, lr=0.1, rounds=2, client_exec="sequential", out=str(tmp_path / name), **kw)
    return run(cfg, progress=False), _rows(tmp_path / name)


def test_all_reduce_follows_the_simulation_and_ranks_reject_their_own_bad_updates(tmp_path, data_dir):
    data = ["--data-dir", data_dir] if data_dir else []
    # 3 clients on 2 client ranks (one rank trains two); one client is malicious and sends NaN,
    # which its own rank finds and reports with weight 0; FedAvgM keeps server state across rounds
    bad = ["--malicious", "1", "--attack", "nan", "--strategy", "fedavgm"]
    launched = Launched("fl", "launch", "--transport", "torchdist", "--ranks", 3, *FLAGS, *bad, *data, "--out", tmp_path / "ranks", "--no-progress")
    sim, simulated = _simulate(tmp_path, data_dir, "sim", malicious=1, attack="nan", strategy="fedavgm")
    done = launched.done()
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ranks = _rows(tmp_path / "ranks")
    (malicious,) = json.loads((tmp_path / "ranks" / "partition.json").read_text())["malicious"]
    for d, s in zip(ranks, simulated, strict=True):
        assert d["aggregation"] == "all-reduce" and "aggregation" not in s
        assert d["clients"] == 3 and d["dropped"] == [] and d["rejected"] == s["rejected"] == [malicious]
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-4)
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        # one all_reduce: each of the 2 client ranks hands P sums + the weight + 3 slots per client
        assert d["bytes_up"] == 2 * (sim["parameters"] + 1 + 3 * 3) * 4
        assert d["bytes_down"] == 2 * (6 * 8 + 4 * sim["parameters"])
    assert f"round 1: rejected non-finite update(s) from client(s) [{malicious}]" in done.stderr
    assert summary["final_accuracy"] == pytest.approx(sim["final_accuracy"], abs=2e-3)
    assert (tmp_path / "ranks" / "model.safetensors").stat().st_size > 0


def test_rules_that_need_every_update_gather_them(tmp_path, data_dir):
    data = ["--data-dir", data_dir] if data_dir else []
    # one client rank trains all 3 clients and gathers their models to rank 0 for the median
    launched = Launched("fl", "launch", "--transport", "torchdist", "--ranks", 2, *FLAGS, "--strategy", "median", *data,
                        "--out", tmp_path / "ranks", "--no-progress")
    sim, simulated = _simulate(tmp_path, data_dir, "sim", strategy="median")
    done = launched.done()
    assert done.returncode == 0, done.stderr
    for d, s in zip(_rows(tmp_path / "ranks"), simulated, strict=True):
        assert d["aggregation"] == "gather" and d["clients"] == 3 and d["rejected"] == []
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-4)
        assert d["bytes_up"] == 1 * 3 * (sim["parameters"] + 2) * 4  # 3 rows of (id, loss, model)


def test_collective_refuses_what_it_cannot_do(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    # the CLI in this process: each is refused before any process starts
    assert main(["fl", "collective", *FLAGS, "--out", str(tmp_path / "x")]) == 2
    assert "torchrun" in capsys.readouterr().err
    for extra, msg in ((["--secagg"], "gRPC transport"), (["--strategy", "median", "--aggregation", "all-reduce"], "needs each of them")):
        assert main(["fl", "launch", "--transport", "torchdist", *FLAGS, *extra, "--out", str(tmp_path / "y")]) == 2
        assert msg in capsys.readouterr().err
    assert main(["fl", "launch", *FLAGS, "--aggregation", "gather", "--out", str(tmp_path / "z")]) == 2
    assert "--transport torchdist" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "xyz")


class RanksInProcess:
    """The all_reduce path of the collective transport with its client ranks in this process:
    each rank trains its dealt clients and builds its vector (`contribute`), the vectors are
    summed as all_reduce sums them, and rank 0 reads the sum (`reduced`)."""

    def __init__(self, world):
        self.world = world

    def start(self, fed):
        pass

    def collect(self, fed, rnd, global_w, sampled, active):
        total = 0
        for rank in range(1, self.world):
            ids, models, losses = collective.train_dealt(fed, rnd, global_w, active, rank, self.world)
            total = total + collective.contribute(fed, active, ids, models, losses, global_w)
        return collective.reduced(fed, active, total)

    def close(self):
        pass


@pytest.mark.parametrize("kw", [
    dict(strategy="fedadam", malicious=2, attack="nan"),  # server state; ranks reject their own NaN
    dict(strategy="fedprox", max_update_norm=0.5, malicious=1, attack="scale", attack_scale=5.0),  # clipped by each rank
    dict(strategy="fedyogi", dp_clip=0.5, dp_noise_multiplier=1.0),  # equal weights, rank 0 adds the noise
])
def test_all_reduce_sum_gives_the_simulated_model(tmp_path, data_dir, kw):
    cfg = dict(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", clients=6, fraction=1.0,
               local_epochs=1, batch_size=100, lr=0.1, rounds=2, client_exec="sequential", **kw)
    run(FLConfig(**cfg, out=str(tmp_path / "sim")), progress=False)
    run(FLConfig(**cfg, out=str(tmp_path / "sum")), progress=False, transport=RanksInProcess(world=3))
    for d, s in zip(_rows(tmp_path / "sum"), _rows(tmp_path / "sim"), strict=True):
        assert d["aggregation"] == "all-reduce" and d["rejected"] == s["rejected"] and d["clients"] == s["clients"] == 6
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-4)
    a, b = load_file(str(tmp_path / "sum" / "model.safetensors")), load_file(str(tmp_path / "sim" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
