"""The Flower peer of fl_vs_flower.py: Flower's simulation (Ray backend, Message API as in
flwr 1.41's PyTorch quickstart) running the experiment defined in fl_peers.

flower_client_train lives in this regular module (never __main__) so that Ray pickles it by
reference: its actors import this module once and keep the per-actor data cache below
between calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import common
from fl_peers import (
    BATCH_SIZE,
    CLIENTS,
    FLOWER_EVAL_BATCH,
    FRACTION,
    LOCAL_EPOCHS,
    LR,
    MODEL,
    SEED,
    load_data,
    torch_test,
    torch_train,
)

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

    # Ray's workers get the driver's sys.path: with this folder on it they import this
    # module (and its siblings) by name, so flower_client_train is pickled by reference.
    if str(common.HERE) not in sys.path:
        sys.path.insert(0, str(common.HERE))

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
            rec["train_start_wall"] = time.time()
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
        rec.update(eval_start=t0, eval_end=time.perf_counter(), eval_end_wall=time.time(), accuracy=acc, loss=loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    client_app = ClientApp()
    client_app.train()(flower_client_train)

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

    ncpu = common.usable_cpus()
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
        box["ray_ready_wall"] = time.time()

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
