"""The peers of fl_vs_flower.py that are not Flower: the experiment's definition, the textbook
PyTorch loops, and the systems `plain`, `mlsyskit`, `classic` and `noise`.

Each run_* function runs one system inside the child process fl_vs_flower.py starts for it
(`--system NAME`) and returns its result as a dict (written to JSON by the child).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

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


def plain_setup(data_dir: str | None, clients: int) -> tuple[Any, list[Any], Any, Any]:
    """The student's data: (data, IID partitions, training TensorDataset, test DataLoader)."""
    from torch.utils.data import DataLoader, TensorDataset

    from mlsyskit.data import partition

    data = load_data(data_dir)
    parts = partition(data.train_y.numpy(), clients, "iid", seed=SEED)
    train_set = TensorDataset(data.train_x, data.train_y)
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=PLAIN_EVAL_BATCH)
    return data, parts, train_set, test_loader


def plain_clients(global_model: Any, train_set: Any, parts: list[Any], ids: list[int]) -> tuple[list[Any], list[int], list[float]]:
    """One round of the student's local training: a deepcopy of the global model per client,
    a shuffled DataLoader over its partition, plain SGD. (state_dicts, sizes, train losses)."""
    import copy

    from torch.utils.data import DataLoader, Subset

    states, sizes, losses = [], [], []
    for c in ids:
        local = copy.deepcopy(global_model)
        loader = DataLoader(Subset(train_set, parts[c].tolist()), batch_size=BATCH_SIZE, shuffle=True)
        losses.append(torch_train(local, loader, LOCAL_EPOCHS, LR))
        states.append(local.state_dict())
        sizes.append(len(parts[c]))
    return states, sizes, losses


def weighted_average(states: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Sample-weighted FedAvg of state_dicts."""
    total = float(sum(sizes))
    return {k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in states[0]}


# --------------------------------------------------------------------------------------
# System: plain (the hand-written sequential loop)
# --------------------------------------------------------------------------------------


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mlsyskit.models import build_model

    data, parts, train_set, test_loader = plain_setup(args.data_dir, CLIENTS)
    torch.manual_seed(SEED)
    global_model = build_model(MODEL)

    rows: list[dict[str, Any]] = []
    first_round_wall = last_round_wall = None
    for rnd in range(1, args.rounds + 1):
        if first_round_wall is None:
            first_round_wall = time.time()
        t0 = time.perf_counter()
        ids = sampled_clients(SEED, rnd)
        states, sizes, losses = plain_clients(global_model, train_set, parts, ids)
        t_train = time.perf_counter()
        global_model.load_state_dict(weighted_average(states, sizes))
        t_agg = time.perf_counter()
        acc, loss = torch_test(global_model, test_loader)
        t_end = time.perf_counter()
        last_round_wall = time.time()
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
        marks["round_start"][rnd] = (time.time(), time.perf_counter())
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
        marks["finish_start"] = (time.time(), time.perf_counter())
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
# System: classic (two-client MLP baseline, student loop and mlsyskit)
# --------------------------------------------------------------------------------------


def run_classic(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from torch.utils.data import DataLoader, Subset

    from mlsyskit.models import build_model

    (data, parts, train_set, test_loader), load_s = common.timed(plain_setup, args.data_dir, CLASSIC_CLIENTS)

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
    import torch

    from mlsyskit.models import build_model

    _, parts, train_set, test_loader = plain_setup(args.data_dir, CLIENTS)
    finals = []
    for rep in range(1, args.noise_reps + 1):
        torch.manual_seed(SEED)
        global_model = build_model(MODEL)  # same initial model as every system
        torch.manual_seed(1000 + rep)  # other DataLoader shuffles
        for rnd in range(1, args.rounds + 1):
            ids = sampled_clients(1000 + rep, rnd)  # other client samples
            states, sizes, _ = plain_clients(global_model, train_set, parts, ids)
            global_model.load_state_dict(weighted_average(states, sizes))
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

