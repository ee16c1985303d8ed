"""The Flower App that fl_deploy.py runs on Flower's Deployment Runtime (SuperLink + SuperNodes).

fl_deploy.py copies this file as ``flapp.py`` into a temporary Flower App folder (with a
generated pyproject.toml) and submits it with ``flwr run``. Two variants, chosen by the
pyproject's components:

  plain   Message API as in Flower's PyTorch quickstart: ``plain_server`` runs the built-in
          ``flwr.serverapp.strategy.FedAvg`` with a server-side evaluate_fn, ``plain_client``
          trains its partition with a DataLoader and torch.optim.SGD.
  secagg  Flower's SecAgg+ example: a legacy ``FedAvg`` under ``DefaultWorkflow(fit_workflow=
          SecAggPlusWorkflow(...))`` and a NumPyClient ClientApp with ``secaggplus_mod``.

The data split, model, initial weights and local training are those of mlsyskit's runs
(``mlsyskit.data.partition`` iid seed 0 by ``partition-id``, ``build_model`` after
``torch.manual_seed(0)``, plain SGD). The ServerApp writes per-round times, accuracy and the
serialized size of every message (``message_to_proto(...).ByteSize()``, what Flower's gRPC
carries) to the run config's ``out-json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

_DATA: dict[tuple[str, int], Any] = {}


def _cfg(context: Any) -> dict[str, Any]:
    return dict(context.run_config)


def _client_data(data_dir: str, partitions: int) -> Any:
    key = (data_dir, partitions)
    if key not in _DATA:
        from torch.utils.data import TensorDataset

        from mlsyskit.data import load_dataset, partition

        data = load_dataset("mnist-5k", data_dir or None)
        parts = partition(data.train_y.numpy(), partitions, "iid", seed=0)
        _DATA[key] = (TensorDataset(data.train_x, data.train_y), parts)
    return _DATA[key]


def _train(model: Any, context: Any, run: dict[str, Any]) -> tuple[float, int]:
    import torch
    from torch.utils.data import DataLoader, Subset

    torch.set_num_threads(1)
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    train_set, parts = _client_data(str(run["data-dir"]), n)
    loader = DataLoader(Subset(train_set, parts[pid].tolist()), batch_size=int(run["batch-size"]), shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=float(run["lr"]))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(int(run["local-epochs"])):
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
    return total / max(steps, 1), len(parts[pid])


def _evaluator(run: dict[str, Any]) -> Any:
    import torch

    from mlsyskit.data import load_dataset
    from mlsyskit.models import build_model

    data = load_dataset("mnist-5k", str(run["data-dir"]) or None)
    model = build_model(str(run["model"]))

    @torch.no_grad()
    def evaluate(state: dict[str, Any]) -> tuple[float, float]:
        model.load_state_dict(state)
        model.eval()
        logits = torch.cat([model(data.test_x[i : i + 1000]) for i in range(0, len(data.test_x), 1000)])
        loss = float(torch.nn.functional.cross_entropy(logits, data.test_y))
        return float((logits.argmax(-1) == data.test_y).float().mean()), loss

    return evaluate


def _initial_state(run: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mlsyskit.models import build_model

    torch.manual_seed(0)
    return build_model(str(run["model"])).state_dict()


def _proto_bytes(msg: Any) -> int:
    from flwr.common.serde import message_to_proto

    return message_to_proto(msg).ByteSize()


class _Recorder:
    """Per-round wall times, accuracy and message bytes, written to out-json at the end."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run, self.rounds, self.t0 = run, {}, time.perf_counter()
        self.current = 1  # the round the messages now sent belong to

    def row(self, rnd: int) -> dict[str, Any]:
        return self.rounds.setdefault(rnd, {"round": rnd, "bytes_down": 0, "bytes_up": 0})

    def write(self, variant: str) -> None:
        rows = [self.rounds[r] for r in sorted(self.rounds) if r > 0]
        with open(str(self.run["out-json"]), "w") as f:
            json.dump({"variant": variant, "pid": os.getpid(), "rounds": rows, "total_s": time.perf_counter() - self.t0}, f)


# -- plain: the Message API -----------------------------------------------------------------
def _plain_server_main(grid: Any, context: Any) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    run = _cfg(context)
    rec = _Recorder(run)
    evaluate = _evaluator(run)
    nodes = int(run["clients"])

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            row = rec.row(server_round)
            row["start"] = time.perf_counter()
            msgs = list(super().configure_train(server_round, arrays, config, grid))
            row["bytes_down"] += sum(_proto_bytes(m) for m in msgs)
            return msgs

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            row = rec.row(server_round)
            row["bytes_up"] += sum(_proto_bytes(m) for m in replies)
            row["clients"] = sum(1 for m in replies if not m.has_error())
            return super().aggregate_train(server_round, replies)

    def global_evaluate(server_round: int, arrays: Any) -> Any:
        acc, loss = evaluate(arrays.to_torch_state_dict())
        row = rec.row(server_round)
        row.update(test_accuracy=acc, test_loss=loss)
        if "start" in row:
            row["round_s"] = time.perf_counter() - row.pop("start")
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(_initial_state(run)),
        num_rounds=int(run["rounds"]),
        train_config=ConfigRecord({"unused": 0}),
        evaluate_fn=global_evaluate,
    )
    rec.write("plain")


def _plain_client_train(msg: Any, context: Any) -> Any:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from mlsyskit.models import build_model

    run = _cfg(context)
    model = build_model(str(run["model"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, n = _train(model, context, run)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"train_loss": loss, "num-examples": n})})
    return Message(content=content, reply_to=msg)


# -- secagg: Flower's SecAgg+ workflow (legacy strategy + NumPyClient) -------------------------
def _secagg_server_main(grid: Any, context: Any) -> None:
    import numpy as np
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    run = _cfg(context)
    rec = _Recorder(run)
    evaluate = _evaluator(run)
    nodes = int(run["clients"])
    state = _initial_state(run)
    keys = list(state)
    marks: dict[str, float] = {}

    def evaluate_fn(server_round: int, arrays: list[Any], config: Any) -> Any:
        import torch

        acc, loss = evaluate({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})
        row = rec.row(server_round)
        row.update(test_accuracy=acc, test_loss=loss, clients=nodes)
        now = time.perf_counter()
        if server_round > 0:
            row["round_s"] = now - marks["last"]
        marks["last"] = now
        rec.current = server_round + 1
        return loss, {"accuracy": acc}

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=nodes, min_available_clients=nodes,
                      evaluate_fn=evaluate_fn, initial_parameters=ndarrays_to_parameters([v.numpy() for v in state.values()]))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=int(run["rounds"])), strategy=strategy)
    # every client shares with all others; the same threshold rule as ours (a majority)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=nodes, reconstruction_threshold=nodes // 2 + 1))
    workflow(_CountingGrid(grid, rec), legacy)
    rec.write("secagg")


class _CountingGrid:
    """The Grid, passed through, adding every message's serialized size to its round's row."""

    def __init__(self, grid: Any, rec: _Recorder) -> None:
        self._grid, self._rec = grid, rec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _count(self, msgs: Any, key: str) -> None:
        row = self._rec.row(self._rec.current)
        row[key] += sum(_proto_bytes(m) for m in msgs)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        self._count(messages, "bytes_down")
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count(replies, "bytes_up")
        return replies


def _secagg_client_fn(context: Any) -> Any:
    import torch
    from flwr.client import NumPyClient

    from mlsyskit.models import build_model

    run = _cfg(context)

    class Client(NumPyClient):
        def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            model = build_model(str(run["model"]))
            model.load_state_dict({k: torch.from_numpy(p.copy()) for k, p in zip(model.state_dict(), parameters, strict=True)})
            loss, n = _train(model, context, run)
            return [v.detach().numpy() for v in model.state_dict().values()], n, {"train_loss": loss}

    return Client().to_client()


def _apps() -> dict[str, Any]:
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    plain_server = ServerApp()
    plain_server.main()(_plain_server_main)
    plain_client = ClientApp()
    plain_client.train()(_plain_client_train)
    secagg_server = ServerApp()
    secagg_server.main()(_secagg_server_main)
    secagg_client = LegacyClientApp(client_fn=_secagg_client_fn, mods=[secaggplus_mod])
    return {"plain_server": plain_server, "plain_client": plain_client, "secagg_server": secagg_server, "secagg_client": secagg_client}


def __getattr__(name: str) -> Any:  # the components named in pyproject.toml, built on first use
    apps = _apps()
    if name in apps:
        return apps[name]
    raise AttributeError(name)

