"""One federated experiment, three systems: Flower's simulation vs a hand-written loop vs mlsyskit.

The experiment is McMahan et al. (2017)'s FedAvg setup on MNIST-5k: the real 5,000
training digits split IID over 100 clients (mlsyskit.data.partition, seed 0), C=0.1 (10
clients a round), E=1 local epoch, B=10, McMahan's CNN (same init: torch.manual_seed(0)),
plain SGD lr=0.05, sample-weighted FedAvg, and central evaluation of the global model on
the full test set (the real 10,000 MNIST test images when the data dir holds them) after
every round. The systems:

  flower    Flower's simulation (Ray backend) written as Flower's PyTorch quickstart does
            it in flwr 1.41: a ClientApp (Message API) that trains with a DataLoader over
            its partition and torch.optim.SGD, a ServerApp running the built-in FedAvg
            (fraction_train=0.1, fraction_evaluate=0) with a server-side evaluate_fn.
  plain     the sequential PyTorch loop a student writes (deepcopy, DataLoader, SGD,
            weighted average of state_dicts, DataLoader evaluation).
  mlsyskit  mlsyskit.fl.run(FLConfig(...)); per-round times from its metrics.jsonl.
  classic   the two-client baseline students write first (784-64-10 MLP, 2 clients,
            2 rounds, 2 local epochs, B=10, unweighted average), next to mlsyskit
            running the same configuration.

Every system runs in its own subprocess (this script re-invoked with --system NAME), so
its peak memory can be measured: the parent polls the child's whole process tree (Ray
starts many processes) every --poll-interval seconds and records the peak of the SUM of
RSS over the tree (and, less often, the sum of PSS, which counts shared pages once).

Results go to benchmarks/results/fl_vs_flower.json and a bar chart next to it (.png).
Run:  .venv/bin/python benchmarks/fl_vs_flower.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "fl_vs_flower.json"

SYSTEMS = ("flower", "plain", "mlsyskit", "classic")
CNN_SYSTEMS = ("flower", "plain", "mlsyskit")

# The experiment (McMahan et al. 2017, MNIST CNN, IID).
DATASET = "mnist-5k"
MODEL = "cnn"
CLIENTS = 100
FRACTION = 0.1
LOCAL_EPOCHS = 1
BATCH_SIZE = 10
LR = 0.05
SEED = 0
PLAIN_EVAL_BATCH = 1000
FLOWER_EVAL_BATCH = 128  # Flower's PyTorch examples use 32-128 for their test DataLoaders

# The classic two-client baseline.
CLASSIC_MODEL = "mlp"
CLASSIC_CLIENTS = 2
CLASSIC_ROUNDS = 2
CLASSIC_EPOCHS = 2
CLASSIC_BATCH = 10
CLASSIC_LR = 0.05

# Goals from the issue (mlsyskit relative to the others).
GOAL_TRAIN_VS_FLOWER = 4.0
GOAL_TRAIN_VS_PLAIN = 1.8
GOAL_ROUND_VS_FLOWER = 4.0
GOAL_MEMORY_VS_FLOWER = 0.5
# Accuracy "equal within noise": |difference| <= max(floor, NOISE_SIGMAS * std of the final
# accuracy over --noise-reps reruns of the plain loop with other shuffles and client samples).
ACC_TOL_FLOOR = 0.005  # ~1.5 binomial standard errors of a 10k-image test accuracy
ACC_TOL_NO_NOISE = 0.01  # used when the noise was not measured (--noise-reps 0)
NOISE_SIGMAS = 3.0

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------
# Shared pieces (used inside the children)
# --------------------------------------------------------------------------------------


def sampled_clients(seed: int, rnd: int, clients: int = CLIENTS, fraction: float = FRACTION) -> list[int]:
    """The round's clients exactly as mlsyskit's FedAvg strategy samples them."""
    m = max(int(round(fraction * clients)), 1)
    rng = np.random.default_rng([seed, rnd])
    return sorted(int(c) for c in rng.choice(clients, size=m, replace=False))


def load_data(data_dir: str | None) -> Any:
    from mlsyskit.data import load_dataset

    return load_dataset(DATASET, data_dir)


def torch_train(model: Any, loader: Any, epochs: int, lr: float) -> float:
    """The textbook PyTorch training loop (Flower's tutorial `train`, with plain SGD)."""
    import torch

    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    running, steps = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            running += loss.item()
            steps += 1
    return running / max(steps, 1)


def torch_test(model: Any, loader: Any) -> tuple[float, float]:
    """The textbook evaluation loop: (accuracy, mean loss per sample)."""
    import torch

    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            outputs = model(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
            n += len(labels)
    return correct / n, loss / n


def _wall() -> float:
    return time.time()


# --------------------------------------------------------------------------------------
# System: plain (the hand-written sequential loop)
# --------------------------------------------------------------------------------------


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from mlsyskit.data import partition
    from mlsyskit.models import build_model

    data = load_data(args.data_dir)
    parts = partition(data.train_y.numpy(), CLIENTS, "iid", seed=SEED)
    train_set = TensorDataset(data.train_x, data.train_y)
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=PLAIN_EVAL_BATCH)
    torch.manual_seed(SEED)
    global_model = build_model(MODEL)

    rows: list[dict[str, Any]] = []
    first_round_wall = last_round_wall = None
    for rnd in range(1, args.rounds + 1):
        if first_round_wall is None:
            first_round_wall = _wall()
        t0 = time.perf_counter()
        ids = sampled_clients(SEED, rnd)
        states, sizes, losses = [], [], []
        for c in ids:
            local = copy.deepcopy(global_model)
            loader = DataLoader(Subset(train_set, parts[c].tolist()), batch_size=BATCH_SIZE, shuffle=True)
            losses.append(torch_train(local, loader, LOCAL_EPOCHS, LR))
            states.append(local.state_dict())
            sizes.append(len(parts[c]))
        t_train = time.perf_counter()
        total = float(sum(sizes))
        avg = {k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in states[0]}
        global_model.load_state_dict(avg)
        t_agg = time.perf_counter()
        acc, loss = torch_test(global_model, test_loader)
        t_end = time.perf_counter()
        last_round_wall = _wall()
        rows.append(
            {
                "round": rnd,
                "train_s": t_train - t0,
                "aggregate_s": t_agg - t_train,
                "eval_s": t_end - t_agg,
                "round_s": t_end - t0,
                "test_accuracy": acc,
                "test_loss": loss,
                "train_loss": float(np.mean(losses)),
                "clients": ids,
            }
        )
    return {
        "system": "plain",
        "test_size": len(data.test_y),
        "train_size": len(data.train_y),
        "description": "sequential loop: copy.deepcopy(global) per client, DataLoader(Subset, "
        f"batch_size={BATCH_SIZE}, shuffle=True), torch.optim.SGD(lr={LR}), {LOCAL_EPOCHS} epoch; "
        "sample-weighted average of state_dicts; DataLoader(test, "
        f"batch_size={PLAIN_EVAL_BATCH}) evaluation",
        "torch_threads": torch.get_num_threads(),
        "test_source": data.test_source,
        "rounds": rows,
        "first_round_wall": first_round_wall,
        "last_round_end_wall": last_round_wall,
    }


# --------------------------------------------------------------------------------------
# System: mlsyskit
# --------------------------------------------------------------------------------------


def _run_mlsyskit(cfg_kwargs: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run mlsyskit.fl.run and time its phases.

    mlsyskit's own metrics.jsonl gives per-round train_s and wall_s. The thin wrappers
    below only take timestamps (they call the originals unchanged): when the first round
    starts (to separate start-up), when each round starts (so the real period between
    rounds, which also covers the checkpoint mlsyskit writes after wall_s is taken, can be
    reported) and how long evaluation takes.
    """
    import torch

    from mlsyskit.fl import FLConfig, run
    from mlsyskit.fl import simulation as sim

    marks: dict[str, Any] = {"round_start": {}, "sampled": {}, "eval_s": {}, "current": None}
    eval_batch = inspect.signature(sim.evaluate).parameters.get("batch_size")
    originals = {name: getattr(sim, name) for name in ("setup", "run_round", "evaluate", "finish")}

    def setup(cfg: Any) -> Any:
        t = time.perf_counter()
        fed = originals["setup"](cfg)
        marks["setup_s"] = time.perf_counter() - t
        marks["client_exec"] = "vmap" if fed.vectorized else "sequential"
        return fed

    def run_round(fed: Any, rnd: int, global_w: Any) -> Any:
        marks["round_start"][rnd] = (_wall(), time.perf_counter())
        marks["current"] = rnd
        res = originals["run_round"](fed, rnd, global_w)
        marks["sampled"][rnd] = [int(c) for c in res.sampled]
        return res

    def evaluate(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = originals["evaluate"](*a, **kw)
        marks["eval_s"][marks["current"]] = time.perf_counter() - t
        return out

    def finish(*a: Any, **kw: Any) -> Any:
        marks["finish_start"] = (_wall(), time.perf_counter())
        out = originals["finish"](*a, **kw)
        marks["finish_s"] = time.perf_counter() - marks["finish_start"][1]
        return out

    for name, fn in (("setup", setup), ("run_round", run_round), ("evaluate", evaluate), ("finish", finish)):
        setattr(sim, name, fn)
    try:
        cfg = FLConfig(**cfg_kwargs, out=str(out))
        summary = run(cfg, progress=False)
    finally:
        for name, fn in originals.items():
            setattr(sim, name, fn)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    starts = marks["round_start"]
    for m in metrics:
        rnd = m["round"]
        nxt = starts.get(rnd + 1, marks.get("finish_start"))
        period = nxt[1] - starts[rnd][1] if nxt is not None else None
        eval_s = marks["eval_s"].get(rnd)
        rows.append(
            {
                "round": rnd,
                "train_s": m["train_s"],
                "round_s": m["wall_s"],
                "eval_s": eval_s,
                "aggregate_s": m["wall_s"] - m["train_s"] - (eval_s or 0.0),
                "round_period_s": period,
                "between_rounds_s": None if period is None else period - m["wall_s"],
                "test_accuracy": m["test_accuracy"],
                "test_loss": m["test_loss"],
                "train_loss": m["train_loss"],
                "clients": marks["sampled"].get(rnd),
            }
        )
    return {
        "rounds": rows,
        "setup_s": marks.get("setup_s"),
        "finish_s": marks.get("finish_s"),
        "client_exec": marks.get("client_exec"),
        "eval_batch_size": None if eval_batch is None else eval_batch.default,
        "torch_threads": torch.get_num_threads(),
        "test_source": summary.get("test_source"),
        "summary_final_accuracy": summary.get("final_accuracy"),
        "first_round_wall": starts[min(starts)][0] if starts else None,
        "last_round_end_wall": marks["finish_start"][0] if "finish_start" in marks else None,
    }


def run_mlsyskit(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.scratch) / "mlsyskit-run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "dataset": DATASET,
        "data_dir": args.data_dir,
        "model": MODEL,
        "clients": CLIENTS,
        "partition": "iid",
        "fraction": FRACTION,
        "local_epochs": LOCAL_EPOCHS,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "rounds": args.rounds,
        "seed": SEED,
    }
    res = _run_mlsyskit(cfg, out)
    res.update(
        system="mlsyskit",
        description="mlsyskit.fl.run(FLConfig(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + "))",
        config=cfg,
    )
    return res


# --------------------------------------------------------------------------------------
# System: flower (Flower simulation, Ray backend, Message API as in flwr 1.41's quickstart)
# --------------------------------------------------------------------------------------

# Per Ray-actor cache of the client data, like the module-level `fds` in Flower's tutorial
# `task.py`: every actor process loads the data once, then builds its partition's
# DataLoader on each call.
_FLOWER_CLIENT_DATA: dict[tuple[str, int], Any] = {}
_FLOWER_DATA_LOADS = [0]  # loads in this actor process (1 if the cache works)


def _flower_client_data(data_dir: str, num_partitions: int) -> Any:
    key = (data_dir, num_partitions)
    if key not in _FLOWER_CLIENT_DATA:
        from torch.utils.data import TensorDataset

        from mlsyskit.data import partition

        data = load_data(data_dir or None)
        parts = partition(data.train_y.numpy(), num_partitions, "iid", seed=SEED)
        # Keep only the training tensors (the test set lives on the server).
        _FLOWER_CLIENT_DATA[key] = (TensorDataset(data.train_x, data.train_y), parts)
        _FLOWER_DATA_LOADS[0] += 1
    return _FLOWER_CLIENT_DATA[key]


def flower_client_train(msg: Any, context: Any) -> Any:
    """The ClientApp's @app.train() function, as in Flower's PyTorch quickstart.

    Module-level so Ray pickles it by reference (its actors import this module and keep
    the data cache above between calls); registered on the ClientApp in run_flower.
    """
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from torch.utils.data import DataLoader, Subset

    from mlsyskit.models import build_model

    config = msg.content["config"]
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    train_set, parts = _flower_client_data(str(config["data-dir"]), num_partitions)

    model = build_model(MODEL)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader = DataLoader(
        Subset(train_set, parts[partition_id].tolist()), batch_size=int(config["batch-size"]), shuffle=True
    )
    train_loss = torch_train(model, trainloader, int(config["local-epochs"]), float(config["lr"]))

    metrics = MetricRecord(
        {
            "train_loss": train_loss,
            "num-examples": len(trainloader.dataset),
            "partition-id": partition_id,
            "torch-threads": torch.get_num_threads(),
            "pid": os.getpid(),
            "data-loads": _FLOWER_DATA_LOADS[0],
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def run_flower(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    # Import this file as a regular module so the ClientApp's function is pickled by
    # reference (a function from __main__ would be pickled by value with every message,
    # losing the per-actor data cache). Ray's workers get the driver's sys.path.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    this = importlib.import_module(Path(__file__).stem)

    import flwr
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from mlsyskit.models import build_model

    logging.getLogger("flwr").setLevel(logging.WARNING)

    data = load_data(args.data_dir)
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=FLOWER_EVAL_BATCH)
    torch.manual_seed(SEED)
    initial_arrays = ArrayRecord(build_model(MODEL).state_dict())
    test_source, test_size = data.test_source, len(data.test_y)
    del data

    timing: dict[int, dict[str, Any]] = {}
    box: dict[str, Any] = {}

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, unchanged, with timestamps around the training phase."""

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            rec = timing.setdefault(server_round, {})
            rec["train_start"] = time.perf_counter()
            rec["train_start_wall"] = _wall()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            rec = timing.setdefault(server_round, {})
            rec["replies_in"] = time.perf_counter()
            ok = [m for m in replies if not m.has_error()]
            rec["clients"] = sorted(int(m.content["metrics"]["partition-id"]) for m in ok)
            rec["actor_pids"] = sorted({int(m.content["metrics"]["pid"]) for m in ok})
            rec["actor_torch_threads"] = sorted({int(m.content["metrics"]["torch-threads"]) for m in ok})
            rec["actor_data_loads_max"] = max((int(m.content["metrics"]["data-loads"]) for m in ok), default=0)
            rec["errors"] = [str(m.error.reason) for m in replies if m.has_error()]
            out = super().aggregate_train(server_round, replies)
            rec["train_end"] = time.perf_counter()
            return out

    def global_evaluate(server_round: int, arrays: Any) -> Any:
        t0 = time.perf_counter()
        model = build_model(MODEL)
        model.load_state_dict(arrays.to_torch_state_dict())
        acc, loss = torch_test(model, test_loader)
        rec = timing.setdefault(server_round, {})
        rec.update(eval_start=t0, eval_end=time.perf_counter(), eval_end_wall=_wall(), accuracy=acc, loss=loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    client_app = ClientApp()
    client_app.train()(this.flower_client_train)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_train=FRACTION, fraction_evaluate=0.0, min_available_nodes=CLIENTS
        )
        box["result"] = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=args.rounds,
            train_config=ConfigRecord(
                {
                    "lr": LR,
                    "local-epochs": LOCAL_EPOCHS,
                    "batch-size": BATCH_SIZE,
                    "data-dir": args.data_dir or "",
                }
            ),
            evaluate_fn=global_evaluate,
        )

    ncpu = len(os.sched_getaffinity(0))
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": ncpu,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }
    backend_config_report = json.loads(json.dumps(backend_config))

    # Timestamp only: when Ray is up and the actor pool is built (Flower starts the
    # ServerApp, and with it the round-0 evaluation, while Ray is still starting).
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original_build = RayBackend.build

    def build(self: Any, app_fn: Any) -> None:
        original_build(self, app_fn)
        box["ray_ready_wall"] = _wall()

    RayBackend.build = build
    t_sim = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=CLIENTS,
        backend_config=backend_config,
    )
    sim_s = time.perf_counter() - t_sim
    ray_still_up = ray.is_initialized()

    missing = [r for r in range(1, args.rounds + 1) if "eval_end" not in timing.get(r, {})]
    errors = {r: timing[r]["errors"] for r in timing if timing[r].get("errors")}
    if "result" not in box or missing or errors:
        raise RuntimeError(f"Flower simulation did not finish cleanly: missing rounds {missing}, client errors {errors}")

    rows = []
    for rnd in range(1, args.rounds + 1):
        t = timing[rnd]
        rows.append(
            {
                "round": rnd,
                "train_s": t["train_end"] - t["train_start"],
                "train_until_replies_s": t["replies_in"] - t["train_start"],
                "aggregate_s": t["train_end"] - t["replies_in"],
                "eval_s": t["eval_end"] - t["eval_start"],
                "round_s": t["eval_end"] - t["train_start"],
                "test_accuracy": t["accuracy"],
                "test_loss": t["loss"],
                "clients": t["clients"],
                "actor_pids": t["actor_pids"],
                "actor_torch_threads": t["actor_torch_threads"],
                "actor_data_loads_max": t["actor_data_loads_max"],
            }
        )
    init_eval = timing.get(0, {})
    return {
        "system": "flower",
        "description": "flwr.simulation.run_simulation (Ray backend) with a ClientApp "
        "(@app.train: build CNN, load the global ArrayRecord, DataLoader(Subset(partition), "
        f"batch_size={BATCH_SIZE}, shuffle=True), torch.optim.SGD(lr={LR}), {LOCAL_EPOCHS} epoch) and "
        "a ServerApp running flwr.serverapp.strategy.FedAvg(fraction_train=0.1, "
        "fraction_evaluate=0.0, min_available_nodes=100) with a server-side evaluate_fn "
        f"(DataLoader(test, batch_size={FLOWER_EVAL_BATCH}))",
        "api": "Message API (flwr.clientapp.ClientApp / flwr.serverapp.ServerApp / "
        "flwr.serverapp.strategy.FedAvg) launched with flwr.simulation.run_simulation; flwr 1.41 "
        "logs a deprecation warning for run_simulation (in favour of the `flwr run` CLI) "
        "but runs it",
        "flwr_version": flwr.__version__,
        "ray_version": ray.__version__,
        "backend": "ray",
        "backend_config": backend_config_report,
        "num_supernodes": CLIENTS,
        "eval_batch_size": FLOWER_EVAL_BATCH,
        "server_torch_threads": torch.get_num_threads(),
        "test_source": test_source,
        "test_size": test_size,
        "initial_eval_s": (init_eval["eval_end"] - init_eval["eval_start"]) if init_eval else None,
        "initial_eval_note": "Strategy.start() evaluates the initial model (round 0) before round 1 "
        "when evaluate_fn is given; it runs while Ray is still starting (in parallel), so it is "
        "part of startup_s, and excluded from the rounds",
        "ray_ready_wall": box.get("ray_ready_wall"),
        "simulation_s": sim_s,
        "ray_initialized_after_run": ray_still_up,
        "rounds": rows,
        "first_round_wall": timing[1]["train_start_wall"],
        "last_round_end_wall": timing[args.rounds]["eval_end_wall"],
    }


# --------------------------------------------------------------------------------------
# System: classic (two-client MLP baseline, student loop and mlsyskit)
# --------------------------------------------------------------------------------------


def run_classic(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from mlsyskit.data import partition
    from mlsyskit.models import build_model

    t_load = time.perf_counter()
    data = load_data(args.data_dir)
    parts = partition(data.train_y.numpy(), CLASSIC_CLIENTS, "iid", seed=SEED)
    train_set = TensorDataset(data.train_x, data.train_y)
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=PLAIN_EVAL_BATCH)
    load_s = time.perf_counter() - t_load

    # One tiny forward/backward first, so neither of the two runs below pays PyTorch's
    # first-call initialisation alone.
    warm = build_model(CLASSIC_MODEL)
    torch.nn.functional.cross_entropy(warm(data.train_x[:10]), data.train_y[:10]).backward()

    torch.manual_seed(SEED)
    global_model = build_model(CLASSIC_MODEL)
    loaders = [
        DataLoader(Subset(train_set, p.tolist()), batch_size=CLASSIC_BATCH, shuffle=True) for p in parts
    ]
    student_rows = []
    t_all = time.perf_counter()
    for rnd in range(1, CLASSIC_ROUNDS + 1):
        t0 = time.perf_counter()
        states = []
        for loader in loaders:
            local = copy.deepcopy(global_model)
            torch_train(local, loader, CLASSIC_EPOCHS, CLASSIC_LR)
            states.append(local.state_dict())
        t_train = time.perf_counter()
        global_model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
        acc, loss = torch_test(global_model, test_loader)
        t_end = time.perf_counter()
        student_rows.append(
            {"round": rnd, "train_s": t_train - t0, "round_s": t_end - t0, "eval_s": t_end - t_train,
             "test_accuracy": acc, "test_loss": loss}
        )
    student_total = time.perf_counter() - t_all

    out = Path(args.scratch) / "classic-mlsyskit-run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "dataset": DATASET,
        "data_dir": args.data_dir,
        "model": CLASSIC_MODEL,
        "clients": CLASSIC_CLIENTS,
        "partition": "iid",
        "fraction": 1.0,
        "local_epochs": CLASSIC_EPOCHS,
        "batch_size": CLASSIC_BATCH,
        "lr": CLASSIC_LR,
        "rounds": CLASSIC_ROUNDS,
        "seed": SEED,
    }
    t_m = time.perf_counter()
    ours = _run_mlsyskit(cfg, out)
    mlsyskit_call_s = time.perf_counter() - t_m
    ours_rounds = ours["rounds"]
    return {
        "system": "classic",
        "description": f"784-64-10 MLP (build_model('mlp')), {CLASSIC_CLIENTS} clients (iid split of the "
        f"5,000 digits, seed {SEED}: {[len(p) for p in parts]} samples), {CLASSIC_ROUNDS} rounds, "
        f"{CLASSIC_EPOCHS} local epochs, B={CLASSIC_BATCH}, plain SGD lr={CLASSIC_LR}, same init "
        "(torch.manual_seed(0)); the student loop averages the two state_dicts UNWEIGHTED, "
        "mlsyskit weights by sample count, which is the same here because both clients hold "
        f"{len(parts[0])} samples",
        "equal_split": len({len(p) for p in parts}) == 1,
        "test_source": data.test_source,
        "data_load_s": load_s,
        "student": {
            "rounds": student_rows,
            "total_s": student_total,
            "train_s_total": sum(r["train_s"] for r in student_rows),
            "final_accuracy": student_rows[-1]["test_accuracy"],
        },
        "mlsyskit": {
            "config": cfg,
            "client_exec": ours["client_exec"],
            "rounds": ours_rounds,
            "total_s": sum(r["round_s"] for r in ours_rounds),
            "train_s_total": sum(r["train_s"] for r in ours_rounds),
            "run_call_s": mlsyskit_call_s,
            "setup_s": ours["setup_s"],
            "finish_s": ours["finish_s"],
            "final_accuracy": ours_rounds[-1]["test_accuracy"],
        },
        "torch_threads": torch.get_num_threads(),
        "note": "both rounds counted (no warm-up round is skipped with only 2 rounds); total_s is "
        "the sum of whole-round times (training + averaging + test evaluation); mlsyskit's "
        "run_call_s additionally includes its data loading, checkpoints and final model/plot",
    }


# --------------------------------------------------------------------------------------
# Accuracy noise (untimed): the plain loop rerun with other shuffles and client samples
# --------------------------------------------------------------------------------------


def run_noise(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from mlsyskit.data import partition
    from mlsyskit.models import build_model

    data = load_data(args.data_dir)
    parts = partition(data.train_y.numpy(), CLIENTS, "iid", seed=SEED)
    train_set = TensorDataset(data.train_x, data.train_y)
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=PLAIN_EVAL_BATCH)
    finals = []
    for rep in range(1, args.noise_reps + 1):
        torch.manual_seed(SEED)
        global_model = build_model(MODEL)  # same initial model as every system
        torch.manual_seed(1000 + rep)  # other DataLoader shuffles
        for rnd in range(1, args.rounds + 1):
            ids = sampled_clients(1000 + rep, rnd)  # other client samples
            states, sizes = [], []
            for c in ids:
                local = copy.deepcopy(global_model)
                loader = DataLoader(Subset(train_set, parts[c].tolist()), batch_size=BATCH_SIZE, shuffle=True)
                torch_train(local, loader, LOCAL_EPOCHS, LR)
                states.append(local.state_dict())
                sizes.append(len(parts[c]))
            total = float(sum(sizes))
            global_model.load_state_dict(
                {k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in states[0]}
            )
        finals.append(torch_test(global_model, test_loader)[0])
    return {
        "system": "noise",
        "description": f"{args.noise_reps} untimed reruns of the plain loop ({args.rounds} rounds, same "
        "init) with other DataLoader shuffles and other client samples; the spread of their "
        "final test accuracy is the run-to-run noise",
        "final_accuracies": finals,
        "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
        "first_round_wall": None,
        "last_round_end_wall": None,
    }


CHILD_RUNNERS = {
    "flower": run_flower,
    "plain": run_plain,
    "mlsyskit": run_mlsyskit,
    "classic": run_classic,
    "noise": run_noise,
}


def child_main(args: argparse.Namespace) -> int:
    result = CHILD_RUNNERS[args.system](args)
    result["child_done_wall"] = _wall()
    Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))
    return 0


# --------------------------------------------------------------------------------------
# Parent: spawn each system, watch its process tree, summarise
# --------------------------------------------------------------------------------------


def watch_tree(proc: subprocess.Popen, interval: float, pss_every: float, timeout: float) -> dict[str, Any]:
    """Poll the child's process tree until it exits; peak of the summed RSS (and PSS)."""
    import psutil

    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    peak_procs = samples = 0
    seen: dict[int, psutil.Process] = {root.pid: root}
    cpu: dict[int, float] = {}
    last_pss = 0.0
    deadline = time.monotonic() + timeout
    timed_out = False
    while proc.poll() is None:
        if time.monotonic() > deadline:
            timed_out = True
            break
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            seen.setdefault(p.pid, p)
            try:
                with p.oneshot():
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        peak_rss = max(peak_rss, total)
        peak_procs = max(peak_procs, len(procs))
        samples += 1
        now = time.monotonic()
        if now - last_pss >= pss_every:
            last_pss = now
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            peak_pss = max(peak_pss, pss)
        time.sleep(interval)
    if timed_out:
        for p in reversed(list(seen.values())):
            try:
                p.kill()
            except psutil.Error:
                pass
    proc.wait()
    # Processes of this child's tree that outlived it (e.g. Ray daemons): end them by pid.
    leftovers = []
    for pid, p in seen.items():
        if pid == root.pid:
            continue
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{pid} {p.name()}")
                p.terminate()
        except psutil.Error:
            pass
    return {
        "peak_rss_mib": peak_rss / MIB,
        "peak_pss_mib": peak_pss / MIB,
        "peak_processes": peak_procs,
        "memory_samples": samples,
        "cpu_s_tree": sum(cpu.values()),
        "leftover_processes_terminated": leftovers,
        "timed_out": timed_out,
    }


def run_child(name: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    out = scratch / f"{name}.json"
    log = scratch / f"{name}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--system", name,
        "--json-out", str(out),
        "--rounds", str(args.rounds),
        "--noise-reps", str(args.noise_reps),
        "--scratch", str(scratch),
    ]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DISABLE_DOCKER_CPU_WARNING="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    if args.data_dir:
        env["MLSYSKIT_DATA_DIR"] = args.data_dir
    import psutil

    def busy_s() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    me = psutil.Process()
    load_before = os.getloadavg()
    busy0, mine0 = busy_s(), sum(me.cpu_times()[:2])
    with open(log, "w") as logf:
        spawn = _wall()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        mem = watch_tree(proc, args.poll_interval, args.pss_interval, args.child_timeout)
    end = _wall()
    busy, mine = busy_s() - busy0, sum(me.cpu_times()[:2]) - mine0
    res: dict[str, Any] = {"exit_code": proc.returncode, "log": str(log), "process_wall_s": end - spawn}
    res["loadavg_1m_before"] = round(load_before[0], 2)
    res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    res.update(mem)
    # CPU seconds the rest of the machine used meanwhile (other users' jobs): the noise check.
    res["cpu_s_monitor"] = mine
    res["cpu_s_other_processes"] = max(busy - mem["cpu_s_tree"] - mine, 0.0)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").splitlines()[-40:]
        res["error"] = "\n".join(tail)
        return res
    child = json.loads(out.read_text())
    if child.get("first_round_wall"):
        res["startup_s"] = child["first_round_wall"] - spawn
    if child.get("ray_ready_wall"):
        res["ray_ready_s"] = child.pop("ray_ready_wall") - spawn
    if child.get("last_round_end_wall"):
        res["teardown_s"] = end - child["last_round_end_wall"]
    for key in ("first_round_wall", "last_round_end_wall", "child_done_wall"):
        child.pop(key, None)
    res.update(child)
    return res


def _stats(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    timed = vals[1:] if len(vals) > 1 else vals
    if not timed:
        return {}
    return {
        f"{key}_mean": statistics.fmean(timed),
        f"{key}_median": statistics.median(timed),
        f"{key}_round1": vals[0] if vals else None,
        f"{key}_per_round": vals,
    }


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    rows = res.get("rounds") or []
    if not rows:
        return res
    for key in ("train_s", "round_s", "eval_s", "round_period_s"):
        res.update(_stats(rows, key))
    res["final_accuracy"] = rows[-1]["test_accuracy"]
    res["accuracy_per_round"] = [r["test_accuracy"] for r in rows]
    res["clients_per_round"] = [r.get("clients") for r in rows]
    return res


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def compare(systems: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    fl, pl, ml = (systems.get(k, {}) for k in ("flower", "plain", "mlsyskit"))
    ratios = {
        "train_speedup_vs_flower": _ratio(fl.get("train_s_mean"), ml.get("train_s_mean")),
        "train_speedup_vs_plain": _ratio(pl.get("train_s_mean"), ml.get("train_s_mean")),
        "round_speedup_vs_flower": _ratio(fl.get("round_s_mean"), ml.get("round_s_mean")),
        "round_speedup_vs_plain": _ratio(pl.get("round_s_mean"), ml.get("round_s_mean")),
        "memory_ratio_vs_flower": _ratio(ml.get("peak_rss_mib"), fl.get("peak_rss_mib")),
        # Extra views of the same runs (not the goals' definitions):
        "train_speedup_vs_flower_median": _ratio(fl.get("train_s_median"), ml.get("train_s_median")),
        "train_speedup_vs_plain_median": _ratio(pl.get("train_s_median"), ml.get("train_s_median")),
        "round_speedup_vs_flower_median": _ratio(fl.get("round_s_median"), ml.get("round_s_median")),
        "round_speedup_vs_flower_incl_mlsyskit_checkpoint": _ratio(
            fl.get("round_s_mean"), ml.get("round_period_s_mean")
        ),
        "memory_ratio_vs_flower_pss": _ratio(ml.get("peak_pss_mib"), fl.get("peak_pss_mib")),
        "memory_ratio_vs_plain": _ratio(ml.get("peak_rss_mib"), pl.get("peak_rss_mib")),
        "cpu_seconds_ratio_vs_flower": _ratio(ml.get("cpu_s_tree"), fl.get("cpu_s_tree")),
    }
    ratios["definitions"] = (
        "speedup = other system's mean seconds per round / mlsyskit's (rounds 2..R; round 1 is "
        "warm-up and skipped); train = training phase (mlsyskit: metrics train_s; plain: local "
        "training of the 10 clients; flower: configure_train to the end of aggregate_train, so "
        "it includes message passing, Ray dispatch and aggregation); round = whole round incl. "
        "test evaluation (mlsyskit: metrics wall_s, which excludes the checkpoint it writes "
        "between rounds; *_incl_mlsyskit_checkpoint uses the measured period between round "
        "starts instead); memory_ratio = mlsyskit peak summed RSS / flower's"
    )

    noise = systems.get("noise", {})
    std = noise.get("std")
    tol = max(ACC_TOL_FLOOR, NOISE_SIGMAS * std) if std is not None else ACC_TOL_NO_NOISE
    acc_ml = ml.get("final_accuracy")
    diffs = {
        k: (acc_ml - s["final_accuracy"]) if acc_ml is not None and s.get("final_accuracy") is not None else None
        for k, s in (("flower", fl), ("plain", pl))
    }
    known = [d for d in diffs.values() if d is not None]

    def goal(name: str, value: float | None, op: str, target: float, definition: str) -> dict[str, Any]:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        return {"goal": name, "value": value, "target": f"{op} {target}", "met": met, "definition": definition}

    goals = [
        goal("training phase >= 4x Flower", ratios["train_speedup_vs_flower"], ">=", GOAL_TRAIN_VS_FLOWER,
             "train_speedup_vs_flower"),
        goal("training phase >= 1.8x plain PyTorch", ratios["train_speedup_vs_plain"], ">=", GOAL_TRAIN_VS_PLAIN,
             "train_speedup_vs_plain"),
        goal("whole round >= 4x Flower", ratios["round_speedup_vs_flower"], ">=", GOAL_ROUND_VS_FLOWER,
             "round_speedup_vs_flower"),
        goal("peak memory <= 0.5x Flower", ratios["memory_ratio_vs_flower"], "<=", GOAL_MEMORY_VS_FLOWER,
             "memory_ratio_vs_flower (peak summed RSS of the process tree)"),
        {
            "goal": "final accuracy equal within noise",
            "value": {f"mlsyskit_minus_{k}": d for k, d in diffs.items()},
            "target": f"|difference| <= {tol:.4f}",
            "met": (all(abs(d) <= tol for d in known) if len(known) == len(diffs) else None),
            "definition": (
                f"tolerance = max({ACC_TOL_FLOOR}, {NOISE_SIGMAS:g} x std of the final accuracy over "
                f"{len(noise.get('final_accuracies', []))} reruns of the plain loop with other shuffles "
                f"and client samples (std={std}))"
                if std is not None
                else f"tolerance fixed at {ACC_TOL_NO_NOISE} (noise not measured: --noise-reps < 2)"
            ),
        },
    ]
    return {"ratios": ratios, "goals": goals, "accuracy_tolerance": tol}


def roofline(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How close each system runs to this CPU's FP32 peak, and what the speed goals demand.

    FLOPs come from torch's FlopCounterMode on the CNN; the peak is a 2048^3 SGEMM with
    all threads (measured here, after every timed run has finished).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from mlsyskit.models import build_model

    model = build_model(MODEL)
    x, y = torch.randn(BATCH_SIZE, 1, 28, 28), torch.randint(0, 10, (BATCH_SIZE,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train_per_sample = fc.get_total_flops() / BATCH_SIZE
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    fwd_per_sample = fc.get_total_flops() / BATCH_SIZE
    train_n = next((v["train_size"] for v in systems.values() if v.get("train_size")), 5000)
    samples = max(int(round(FRACTION * CLIENTS)), 1) * (train_n // CLIENTS) * LOCAL_EPOCHS
    test_n = next((v["test_size"] for v in systems.values() if v.get("test_size")), 10000)
    train_flop, eval_flop = train_per_sample * samples, fwd_per_sample * test_n

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    peak = 2 * 2048**3 / best

    def gflops(flop: float, sec: float | None) -> float | None:
        return None if not sec else flop / sec / 1e9

    achieved = {
        n: {
            "train_gflops": gflops(train_flop, systems[n].get("train_s_mean")),
            "eval_gflops": gflops(eval_flop, systems[n].get("eval_s_mean")),
        }
        for n in CNN_SYSTEMS
        if n in systems and systems[n].get("train_s_mean")
    }
    fl = systems.get("flower", {})
    need: dict[str, Any] = {}
    if fl.get("train_s_mean"):
        t = fl["train_s_mean"] / GOAL_TRAIN_VS_FLOWER
        need["train_4x_flower"] = {"max_train_s": t, "needs_gflops": train_flop / t / 1e9}
    if systems.get("plain", {}).get("train_s_mean"):
        t = systems["plain"]["train_s_mean"] / GOAL_TRAIN_VS_PLAIN
        need["train_1.8x_plain"] = {"max_train_s": t, "needs_gflops": train_flop / t / 1e9}
    if fl.get("round_s_mean"):
        t = fl["round_s_mean"] / GOAL_ROUND_VS_FLOWER
        need["round_4x_flower"] = {"max_round_s": t, "needs_gflops": (train_flop + eval_flop) / t / 1e9}
    for v in need.values():
        v["fraction_of_sgemm_peak"] = v["needs_gflops"] * 1e9 / peak
    return {
        "train_flop_per_round": train_flop,
        "eval_flop_per_round": eval_flop,
        "train_samples_per_round": samples,
        "test_images": test_n,
        "sgemm_peak_gflops": peak / 1e9,
        "sgemm_threads": torch.get_num_threads(),
        "achieved": achieved,
        "goals_need": need,
        "note": "FLOPs from torch.utils.flop_counter (forward+backward per training sample, forward "
        "per test image); the same exact FP32 FedAvg computation is required of every system, so "
        "a goal that needs more than ~100% of the SGEMM peak cannot be met by any implementation "
        "of this experiment on this machine",
    }


def plot(systems: dict[str, dict[str, Any]], path: Path, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CNN_SYSTEMS if systems.get(n, {}).get("round_s_mean") is not None]
    if not names:
        return
    x = np.arange(len(names))
    train = [systems[n]["train_s_mean"] for n in names]
    whole = [systems[n]["round_s_mean"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    b1 = ax.bar(x - 0.2, train, 0.4, label="training phase")
    b2 = ax.bar(x + 0.2, whole, 0.4, label="whole round (incl. test eval)")
    ax.bar_label(b1, fmt="%.2f", fontsize=8)
    ax.bar_label(b2, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("seconds per round")
    skipped = f"rounds 2-{rounds}, round 1 skipped" if rounds > 1 else "1 round"
    ax.set_title(f"FedAvg MNIST-5k CNN, 10 of 100 clients/round ({skipped})", fontsize=9)
    ax.set_ylim(0, 1.25 * max(whole))
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict[str, Any]) -> None:
    systems = report["systems"]
    print()
    print(f"FedAvg MNIST-5k CNN, {report['experiment']['rounds']} rounds (means/medians over rounds 2..R)")
    head = f"{'system':9} {'train s/rnd':>11} {'(median)':>9} {'round s/rnd':>11} {'(median)':>9} {'eval s':>7} {'peak RSS MiB':>12} {'final acc':>9} {'startup s':>9}"
    print(head)
    print("-" * len(head))
    for name in CNN_SYSTEMS:
        s = systems.get(name)
        if s is None:
            continue
        if "error" in s:
            print(f"{name:9} FAILED (exit {s['exit_code']}), see {s['log']}")
            continue
        print(
            f"{name:9} {_fmt(s.get('train_s_mean')):>11} {_fmt(s.get('train_s_median')):>9} "
            f"{_fmt(s.get('round_s_mean')):>11} {_fmt(s.get('round_s_median')):>9} "
            f"{_fmt(s.get('eval_s_mean')):>7} {_fmt(s.get('peak_rss_mib'), '.0f'):>12} "
            f"{_fmt(s.get('final_accuracy'), '.4f'):>9} {_fmt(s.get('startup_s'), '.1f'):>9}"
        )
    c = systems.get("classic")
    if c and "error" not in c:
        st, ml = c["student"], c["mlsyskit"]
        print(
            f"classic (MLP, 2 clients, 2 rounds, E=2): student loop {st['total_s']:.2f} s, acc "
            f"{st['final_accuracy']:.4f} | mlsyskit {ml['total_s']:.2f} s, acc {ml['final_accuracy']:.4f}"
        )
    elif c:
        print(f"classic FAILED (exit {c['exit_code']}), see {c['log']}")
    r = report.get("ratios", {})
    print(
        "ratios: train vs flower {} | train vs plain {} | round vs flower {} | round vs plain {} | "
        "memory vs flower {}".format(
            *(_fmt(r.get(k), ".2f") for k in (
                "train_speedup_vs_flower", "train_speedup_vs_plain", "round_speedup_vs_flower",
                "round_speedup_vs_plain", "memory_ratio_vs_flower"))
        )
    )
    rf = report.get("roofline")
    if rf:
        parts = [
            f"{n} train {_fmt(v['train_gflops'], '.0f')}/eval {_fmt(v['eval_gflops'], '.0f')}"
            for n, v in rf["achieved"].items()
        ]
        print(f"GFLOP/s achieved (SGEMM peak here {rf['sgemm_peak_gflops']:.0f}): " + "; ".join(parts))
        for name, v in rf["goals_need"].items():
            print(f"  {name} needs {v['needs_gflops']:.0f} GFLOP/s = {v['fraction_of_sgemm_peak']:.0%} of the SGEMM peak")
    for g in report.get("goals", []):
        v = g["value"]
        shown = ", ".join(f"{k}={_fmt(x, '+.4f')}" for k, x in v.items()) if isinstance(v, dict) else _fmt(v, ".2f")
        print(f"  goal {g['goal']:36} {shown:>34}  target {g['target']:<18} met={g['met']}")


def parent_main(args: argparse.Namespace) -> int:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        print(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    if args.data_dir and not Path(args.data_dir).is_dir():
        print(f"--data-dir {args.data_dir} is not a directory", file=sys.stderr)
        return 2
    import psutil  # noqa: F401 - fail early if missing

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="fl_vs_flower-"))
    scratch.mkdir(parents=True, exist_ok=True)
    todo = list(systems)
    if args.noise_reps >= 2 and "mlsyskit" in systems and ({"flower", "plain"} & set(systems)):
        todo.append("noise")

    results: dict[str, dict[str, Any]] = {}
    for name in todo:
        print(f"[fl_vs_flower] running {name} ({args.rounds} rounds) ...", flush=True)
        res = run_child(name, args, scratch)
        if "error" in res:
            print(f"[fl_vs_flower] {name} FAILED (exit {res['exit_code']}); last log lines:\n{res['error']}", flush=True)
        else:
            print(
                f"[fl_vs_flower] {name} done in {res['process_wall_s']:.1f} s "
                f"(peak RSS {res['peak_rss_mib']:.0f} MiB, load before {res['loadavg_1m_before']})",
                flush=True,
            )
        results[name] = summarise(res)
        time.sleep(args.settle)

    import torch

    test_source = next((r.get("test_source") for r in results.values() if r.get("test_source")), None)
    report: dict[str, Any] = {
        "benchmark": "fl_vs_flower",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "note": "shared, noisy machine: compare loadavg_1m_before/after of each system",
        },
        "experiment": {
            "dataset": DATASET,
            "data_dir": args.data_dir,
            "test_source": test_source,
            "model": MODEL,
            "clients": CLIENTS,
            "partition": "iid (mlsyskit.data.partition, seed 0)",
            "fraction": FRACTION,
            "clients_per_round": max(int(round(FRACTION * CLIENTS)), 1),
            "local_epochs": LOCAL_EPOCHS,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "optimizer": "plain SGD, no momentum",
            "aggregation": "sample-weighted FedAvg",
            "init": "torch.manual_seed(0); build_model('cnn')",
            "rounds": args.rounds,
            "sampled_clients": {str(r): sampled_clients(SEED, r) for r in range(1, args.rounds + 1)},
            "sampling_note": "plain and mlsyskit use np.random.default_rng([0, round]).choice(100, 10, "
            "replace=False) sorted; Flower samples with its own random.sample, see "
            "systems.flower.clients_per_round and same_clients_as_mlsyskit",
            "eval_batch_size": {
                "plain": PLAIN_EVAL_BATCH,
                "flower": FLOWER_EVAL_BATCH,
                "mlsyskit": "see systems.mlsyskit.eval_batch_size (mlsyskit.fl.client.evaluate's default)",
            },
            "timing_note": "means and medians skip round 1 (warm-up: first-call initialisation, "
            "Flower's actors loading their data); round-1 values are reported as *_round1. "
            "startup_s = from spawning the system's process to the start of round 1 (imports, "
            "data loading, Ray start, model build; for Flower also its round-0 evaluation of "
            "the initial model, which overlaps Ray's start; see initial_eval_s and ray_ready_s)",
            "memory_note": f"peak of the sum of RSS over the system's whole process tree, polled every "
            f"{args.poll_interval} s (shared pages are counted once per process); peak_pss_mib "
            f"(sampled every {args.pss_interval} s) counts shared pages proportionally",
        },
        "systems": results,
    }
    fl = results.get("flower", {})
    ml = results.get("mlsyskit", {})
    if fl.get("clients_per_round") and ml.get("clients_per_round"):
        fl["same_clients_as_mlsyskit"] = fl["clients_per_round"] == ml["clients_per_round"]
    report.update(compare(results, args.rounds))
    if any(results.get(n, {}).get("train_s_mean") for n in CNN_SYSTEMS):
        report["roofline"] = roofline(results)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = out.with_suffix(".png")
    plot(results, png, args.rounds)
    print_table(report)
    print(f"\nwrote {out}" + (f" and {png}" if png.exists() else ""))
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        print(f"kept logs in {scratch} (failed: {', '.join(failed)})")
    elif not args.keep_scratch and not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"kept scratch dir {scratch}")
    return 1 if failed else 0


def default_data_dir() -> str | None:
    env = os.environ.get("MLSYSKIT_DATA_DIR", "").strip()
    if env:
        return env
    shared = (REPO.parent / "shared" / "data").resolve()
    return str(shared) if shared.is_dir() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FedAvg on MNIST-5k (100 IID clients, C=0.1, E=1, B=10, McMahan CNN, SGD lr 0.05) "
        "run by Flower's simulation (Ray), a hand-written PyTorch loop and mlsyskit, plus the "
        "classic two-client MLP baseline; each system in its own process with its peak memory "
        "measured. Writes a JSON report and a PNG bar chart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=5, help="communication rounds R of the CNN experiment")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds (overrides --rounds)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run: flower (Flower simulation, Ray), plain (hand-written "
        "sequential PyTorch loop), mlsyskit (mlsyskit.fl.run), classic (two-client MLP baseline, "
        "student loop next to mlsyskit)",
    )
    p.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="data dir with mnist/ (the real 10k MNIST test set is used when present); default "
        "$MLSYSKIT_DATA_DIR, else ../shared/data next to the repo",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report path (the PNG chart goes next to it)")
    p.add_argument(
        "--noise-reps",
        type=int,
        default=3,
        help="untimed reruns of the plain loop with other shuffles/client samples, to estimate the "
        "accuracy noise for the 'equal within noise' goal (< 2: fixed tolerance 0.01)",
    )
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between RSS samples of a system's process tree")
    p.add_argument("--pss-interval", type=float, default=1.0, help="seconds between (costlier) PSS samples")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a system's process tree is killed")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to pause between systems")
    p.add_argument("--scratch", default=None, help="scratch dir for logs and run dirs (default: a new temp dir, removed on success)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch dir (logs, mlsyskit run dirs)")
    p.add_argument("--system", choices=sorted(CHILD_RUNNERS), default=None, help="internal: run one system in this process")
    p.add_argument("--json-out", default=None, help="internal: where the --system child writes its result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds = 2
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if args.system:
        if not args.json_out or not args.scratch:
            print("--system needs --json-out and --scratch", file=sys.stderr)
            return 2
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
