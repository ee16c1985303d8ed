"""Federated learning deployed across processes: mlsyskit's gRPC runtime against Flower's.

One experiment, every system as real processes on 127.0.0.1: MNIST-5k split IID over 10
clients (mlsyskit.data.partition, seed 0), all 10 trained every round, E=1, B=10, plain SGD
lr 0.05, McMahan's 2NN (199,210 parameters, same init), central test accuracy each round.

  ours            `mlsyskit fl launch --clients 10` (a server + 10 client processes, gRPC)
  ours-secagg     the same with --secagg (SecAgg with Shamir recovery, threshold 6)
  ours-int8       the same with --compress int8
  ours-dp         the same with --dp-clip 1 --dp-noise-multiplier 0.1 (server noise)
  ours-secagg-dp  --secagg and DP: the clients add the noise
  ours-torchdist  `fl launch --transport torchdist --ranks 11` (gloo broadcast, one weighted all_reduce)
  ours-torchdist-gather  the same with --aggregation gather (every model gathered to rank 0)
  ours-50, ours-secagg-50  `fl launch --clients 50 --clients-per-process 10` (5 client processes
                  hosting 10 clients each, every client its own gRPC session), without and with
                  --secagg (threshold 26)
  collective-ops  gather vs all_reduce alone: 11 gloo ranks, a 2nn-sized float32 vector, timed on
                  rank 0 after a barrier, and the bytes that crossed loopback (/proc/net/dev)
  flower          Flower's Deployment Runtime: flower-superlink + 10 flower-supernode, the
                  App (fl_deploy_flower_app.py, Message API FedAvg) submitted with `flwr run`
  flower-secagg   the same with Flower's SecAgg+ workflow (secaggplus_mod), threshold 6
  naive           the in-process simulation (`mlsyskit.fl.run`): no transport at all

Each system is one process tree (this script re-invoked with --system NAME) whose summed RSS is
sampled (common.watch_tree). Round latency is the mean over rounds 2..R (round 1 includes
warm-up; R = 3 by default to keep the run under 8 minutes on 2 shared cores). Bytes per round: ours are the gRPC payload bytes the server sent and received; Flower's
are the serialized protobuf Messages its ServerApp sent and got back (message_to_proto).

Also, in this process: the cost of secure aggregation's four phases with 10 and 50 clients
(secagg.run_in_process on a 2NN-sized update, all clients in one process: the crypto alone),
and the DP curve: test accuracy against epsilon for 5 noise multipliers (simulation, logreg,
100 clients a round, 5 rounds).

Run:  /tmp/qb .venv/bin/python benchmarks/fl_deploy.py [--rounds 5] [--quick]
      (split: --systems A,B --merge --no-extras adds/replaces those systems in the existing JSON)
Results: benchmarks/results/fl_deploy.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CLIENTS = 10
MODEL = "2nn"
RUN = ["--dataset", "mnist-5k", "--model", MODEL, "--partition", "iid", "--fraction", "1", "--local-epochs", "1",
       "--batch-size", "10", "--lr", "0.05", "--seed", "0", "--threads", "1"]
OURS = {
    "ours": [],
    "ours-secagg": ["--secagg"],
    "ours-int8": ["--compress", "int8"],
    "ours-dp": ["--dp-clip", "1", "--dp-noise-multiplier", "0.1"],
    "ours-secagg-dp": ["--secagg", "--dp-clip", "1", "--dp-noise-multiplier", "0.1"],
    "ours-again": [],  # ours re-measured in a split run (--merge), beside the systems run with it
    "ours-torchdist": ["--transport", "torchdist"],
    "ours-torchdist-gather": ["--transport", "torchdist", "--aggregation", "gather"],
    "ours-50": ["--clients-per-process", "10"],
    "ours-secagg-50": ["--secagg", "--clients-per-process", "10"],
}
SYSTEM_CLIENTS = {"ours-50": 50, "ours-secagg-50": 50}  # else --clients
FLOWER = {"flower": "plain", "flower-secagg": "secagg"}
DEFAULT_OUT = common.RESULTS / "fl_deploy.json"


def host() -> dict[str, Any]:
    """The CPU model, usable cores and platform of this machine."""
    cpu = common.cpu_model()
    return {"cpu": cpu, "cpus": common.usable_cpus(), **common.platform_info()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    later = rows[1:] or rows
    mean = lambda key: sum(float(r[key]) for r in later) / len(later)  # noqa: E731
    return {
        "rounds": len(rows),
        "round_s": mean("round_s"),
        "rounds_per_s": 1.0 / mean("round_s"),
        "first_round_s": rows[0]["round_s"],
        "bytes_up_per_round": mean("bytes_up"),
        "bytes_down_per_round": mean("bytes_down"),
        "bytes_per_round": mean("bytes_up") + mean("bytes_down"),
        "final_accuracy": rows[-1]["test_accuracy"],
        "accuracy_by_round": [r["test_accuracy"] for r in rows],
    }


# -- the systems, each run in a child process -------------------------------------------------
def run_ours(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / "run"
    clients = SYSTEM_CLIENTS.get(name, args.clients)
    cmd = [sys.executable, "-m", "mlsyskit", "fl", "launch", "--clients", str(clients), "--rounds", str(args.rounds),
           *RUN, *OURS[name], "--out", str(out), "--round-timeout", "300", "--no-progress"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["round_s"] = r["wall_s"]
    return {"system": name, "clients": clients, "command": " ".join(cmd[1:]), "total_s": time.perf_counter() - t0, **_summarise(rows),
            "per_round": rows}


def _loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (every process of the machine)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def collective_rank(rank: int, world: int, port: int, size: int, repeats: int) -> None:
    """One rank of collective-ops: time gather and all_reduce of `size` float32 values."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    x = torch.randn(size)
    out: dict[str, Any] = {}
    for op in ("gather", "all_reduce", "gather", "all_reduce"):  # each twice: the first pass warms up
        times = []
        dist.barrier()
        before = _loopback_bytes()
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            if op == "gather":
                dist.gather(x, [torch.empty(size) for _ in range(world)] if rank == 0 else None, dst=0)
            else:
                dist.all_reduce(x.clone())
            times.append(time.perf_counter() - t0)
        dist.barrier()
        lo = _loopback_bytes() - before
        # the barriers' own bytes are a few hundred per round: negligible next to MBs
        out[op] = {"median_s": sorted(times)[len(times) // 2], "min_s": min(times), "loopback_bytes_per_op": lo / repeats}
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


def run_collective_ops(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    world, size, repeats = args.clients + 1, 199_210, 20
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--collective-rank", f"{r},{world},{port},{size},{repeats}"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(world)]
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"collective-ops ranks exited {[p.returncode for p in procs]}")
    got = json.loads(outs[0].strip().splitlines()[-1])
    return {"system": name, "world": world, "floats": size, "repeats": repeats, "payload_bytes_per_rank": 4 * size, **got}


def run_naive(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from mlsyskit.fl import FLConfig, run

    cfg = FLConfig(dataset="mnist-5k", data_dir=args.data_dir, model=MODEL, partition="iid", clients=args.clients, fraction=1.0,
                   local_epochs=1, batch_size=10, lr=0.05, rounds=args.rounds, seed=0, threads=1, out=str(tmp / "run"))
    t0 = time.perf_counter()
    run(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["round_s"] = r["wall_s"]
    return {"system": name, "command": "mlsyskit.fl.run (in process)", "total_s": time.perf_counter() - t0, **_summarise(rows), "per_round": rows}


def _flower_app(tmp: Path, variant: str, args: argparse.Namespace, out_json: Path) -> Path:
    app = tmp / "app"
    app.mkdir()
    shutil.copy(common.HERE / "fl_deploy_flower_app.py", app / "flapp.py")
    (app / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "mlsyskitbench"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mlsyskit"

[tool.flwr.app.components]
serverapp = "flapp:{variant}_server"
clientapp = "flapp:{variant}_client"

[tool.flwr.app.config]
clients = {args.clients}
rounds = {args.rounds}
model = "{MODEL}"
data-dir = "{args.data_dir or ''}"
batch-size = 10
lr = 0.05
local-epochs = 1
out-json = "{out_json}"
""")
    return app


def run_flower(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import flwr

    variant = FLOWER[name]
    home = tmp / "flwr-home"
    home.mkdir()
    fleet, appio, control = _free_port(), _free_port(), _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{control}"\ninsecure = true\n')
    bindir = Path(sys.executable).parent  # Flower starts its flower-superexec helpers from PATH
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    out_json = tmp / "flower.json"
    app = _flower_app(tmp, variant, args, out_json)
    procs = [common.spawn_logged([str(bindir / "flower-superlink"), "--insecure", "--fleet-api-address", f"127.0.0.1:{fleet}",
                                  "--serverappio-api-address", f"127.0.0.1:{appio}", "--control-api-address", f"127.0.0.1:{control}"],
                                 tmp / "superlink.log", env=env)]
    t0 = time.perf_counter()
    try:
        time.sleep(2)
        for k in range(args.clients):
            procs.append(common.spawn_logged(
                [str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                 "--clientappio-api-address", f"127.0.0.1:{_free_port()}",
                 "--node-config", f"partition-id={k} num-partitions={args.clients}"],
                tmp / f"supernode{k}.log", env=env))
        done = subprocess.run([str(bindir / "flwr"), "run", str(app), "deploy", "--stream"], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=args.timeout)
        deadline = time.monotonic() + 60
        while not out_json.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not out_json.exists():
            logs = "\n".join((tmp / f).read_text()[-2000:] for f in ("superlink.log", "supernode0.log"))
            raise RuntimeError(f"Flower run wrote no results: flwr run rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs}")
    finally:
        for p in procs:
            common.stop_process(p, grace=5)
    got = json.loads(out_json.read_text())
    rows = got["rounds"]
    return {"system": name, "flwr_version": flwr.__version__, "variant": variant, "total_s": time.perf_counter() - t0,
            **_summarise(rows), "per_round": rows}


RUNNERS = {**{n: run_ours for n in OURS}, **{n: run_flower for n in FLOWER}, "naive": run_naive, "collective-ops": run_collective_ops}


# -- in this process: secure aggregation's cost, and the DP curve --------------------------------
def secagg_cost(params: int, clients: list[int], repeats: int) -> list[dict[str, Any]]:
    import numpy as np

    from mlsyskit.fl import secagg

    rng = np.random.default_rng(0)
    rows = []
    for n in clients:
        values = {c: secagg.encode(rng.normal(0, 0.01, params)) for c in range(n)}
        t = secagg.default_threshold(n)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            secagg.run_in_process(values, 1, 0, t)
            times.append(time.perf_counter() - t0)
        drop = set(range(n // 10 or 1))
        t0 = time.perf_counter()
        secagg.run_in_process(values, 1, 0, t, drop_before_mask=drop)
        with_drop = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            sum(v.astype(np.float64) for v in values.values())
        plain = (time.perf_counter() - t0) / repeats
        rows.append({"clients": n, "threshold": t, "protocol_s": min(times), "protocol_s_per_client": min(times) / n,
                     "protocol_s_with_dropouts": with_drop, "dropped": len(drop), "plain_sum_s": plain})
    return rows


def dp_curve(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    from mlsyskit.fl import FLConfig, run

    rows = []
    for z in args.noise:
        cfg = FLConfig(dataset="mnist-5k", data_dir=args.data_dir, model="logreg", clients=100, fraction=1.0, local_epochs=1,
                       batch_size=10, lr=0.05, rounds=args.dp_rounds, seed=0, threads=1, dp_clip=0.5, dp_noise_multiplier=z,
                       out=str(tmp / f"dp{z}"))
        s = run(cfg, progress=False)
        last = json.loads((tmp / f"dp{z}" / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({"noise_multiplier": z, "epsilon": last["epsilon"], "delta": last["delta"], "test_accuracy": s["final_accuracy"]})
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    systems = [s for s in result["systems"] if "round_s" in s]
    names = [s["system"] for s in systems]
    axes[0].barh(names, [s["round_s"] for s in systems], color=["C1" if n.startswith("flower") else "C0" for n in names])
    axes[0].set_xlabel("seconds per round (rounds 2..R)")
    axes[1].barh(names, [s["bytes_per_round"] / 2**20 for s in systems], color=["C1" if n.startswith("flower") else "C0" for n in names])
    axes[1].set_xlabel("MiB per round (up + down)")
    dp = result["dp_curve"]
    axes[2].plot([r["epsilon"] for r in dp], [r["test_accuracy"] for r in dp], "o-")
    for r in dp:
        axes[2].annotate(f"z={r['noise_multiplier']}", (r["epsilon"], r["test_accuracy"]), fontsize=8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel(f"epsilon (delta={dp[0]['delta']:g}, after {result['config']['dp_rounds']} rounds)")
    axes[2].set_ylabel("test accuracy")
    fig.suptitle(f"FL deployed on loopback, {result['config']['clients']} clients (-50 rows: 50), {MODEL} on MNIST-5k ({result['host']['cpu']}, {result['host']['cpus']} cores)", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=CLIENTS)
    p.add_argument("--systems", default="ours,flower,ours-secagg,flower-secagg,ours-int8,ours-secagg-dp,ours-torchdist,"
                   "ours-torchdist-gather,collective-ops,ours-50,ours-secagg-50,naive")
    p.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--dp-rounds", type=int, default=5)
    p.add_argument("--data-dir", default=common.default_data_dir())
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)  # child: run one system, print JSON
    p.add_argument("--quick", action="store_true", help="2 rounds, 3 noise levels: a smoke run")
    p.add_argument("--merge", action="store_true",
                   help="keep the other systems (and, with --no-extras, the secagg cost and DP curve) of the existing --out JSON: "
                   "a long benchmark split into several exclusive runs")
    p.add_argument("--no-extras", action="store_true", help="skip the in-process secagg cost and DP curve")
    p.add_argument("--collective-rank", default=None, help=argparse.SUPPRESS)  # child of collective-ops
    args = p.parse_args()
    if args.collective_rank:
        collective_rank(*map(int, args.collective_rank.split(",")))
        return
    if args.quick:
        args.rounds, args.noise, args.dp_rounds = 2, [0.5, 1.0, 4.0], 3
    if args.system:
        with tempfile.TemporaryDirectory(prefix="fl-deploy-") as tmp:
            print(json.dumps(RUNNERS[args.system](args.system, args, Path(tmp))))
        return
    prev = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else {}
    load_before = common.loadavgs()
    common.log(f"fl_deploy: uptime {Path('/proc/loadavg').read_text().strip()}")
    systems: list[dict[str, Any]] = []
    for name in common.split_names(args.systems):
        common.log(f"fl_deploy: {name}")
        cmd = [sys.executable, __file__, "--system", name, "--rounds", str(args.rounds), "--clients", str(args.clients),
               "--timeout", str(args.timeout), *(["--data-dir", args.data_dir] if args.data_dir else [])]
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=sys.stderr, text=True)
            mem = common.watch_tree(proc, interval=0.25, pss_every=5.0, timeout=args.timeout + 120)
            out.seek(0)
            text = out.read().strip()
        if proc.returncode != 0 or not text:
            systems.append({"system": name, "error": f"exit {proc.returncode}", **mem})
            continue
        systems.append({**json.loads(text.splitlines()[-1]), "loadavg_at_end": common.loadavgs(), **mem})
        got = systems[-1]
        if "round_s" in got:
            common.log(f"  {name}: {got['round_s']:.2f} s/round, {got['bytes_per_round'] / 2**20:.2f} MiB/round, "
                       f"accuracy {got['final_accuracy']:.4f}, peak RSS {mem['peak_rss_mib']:.0f} MiB")
        else:
            common.log(f"  {name}: {json.dumps({k: v for k, v in got.items() if k in ('gather', 'all_reduce')})}")
        write(args, load_before, systems, prev.get("secagg_cost"), prev.get("dp_curve"), prev)  # partial results survive a timeout
    cost, dp = prev.get("secagg_cost"), prev.get("dp_curve")
    if not args.no_extras:
        common.log("fl_deploy: secure aggregation cost, DP curve")
        with tempfile.TemporaryDirectory(prefix="fl-deploy-") as tmp:
            cost = secagg_cost(199_210, [10, 50], repeats=1 if args.quick else 2)
            dp = dp_curve(args, Path(tmp))
    out = write(args, load_before, systems, cost, dp, prev)
    if dp:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
    common.log(f"fl_deploy: uptime {Path('/proc/loadavg').read_text().strip()}; wrote {out}")


def ratios(systems: list[dict[str, Any]]) -> dict[str, float | None]:
    """The headline ratios; each compares two systems of one exclusive run (`ours-again` is
    `ours` re-measured in a later split run, for the systems measured with it)."""
    by = {s["system"]: s for s in systems if "round_s" in s}

    def ratio(a: str, b: str, key: str) -> float | None:
        return by[a][key] / by[b][key] if a in by and b in by else None

    ops = next((s for s in systems if s["system"] == "collective-ops" and "gather" in s), None)
    grpc = "ours-again" if "ours-again" in by else "ours"
    return {
        "round_s_ours_over_flower": ratio("ours", "flower", "round_s"),
        "bytes_ours_over_flower": ratio("ours", "flower", "bytes_per_round"),
        "round_s_secagg_over_plain_ours": ratio("ours-secagg", "ours", "round_s"),
        "round_s_secagg_over_plain_flower": ratio("flower-secagg", "flower", "round_s"),
        "bytes_up_int8_over_float32": ratio("ours-int8", "ours", "bytes_up_per_round"),
        "round_s_torchdist_over_grpc": ratio("ours-torchdist", grpc, "round_s"),
        "round_s_all_reduce_over_gather": ratio("ours-torchdist", "ours-torchdist-gather", "round_s"),
        "bytes_up_all_reduce_over_gather": ratio("ours-torchdist", "ours-torchdist-gather", "bytes_up_per_round"),
        "op_s_all_reduce_over_gather": ops["all_reduce"]["median_s"] / ops["gather"]["median_s"] if ops else None,
        "loopback_bytes_all_reduce_over_gather": (
            ops["all_reduce"]["loopback_bytes_per_op"] / ops["gather"]["loopback_bytes_per_op"] if ops else None),
        "round_s_secagg_over_plain_ours_50": ratio("ours-secagg-50", "ours-50", "round_s"),
        "round_s_naive_over_grpc": ratio("naive", "ours", "round_s"),
    }


def write(args: argparse.Namespace, load_before: list[float], systems: list[dict[str, Any]], cost: Any, dp: Any,
          prev: dict[str, Any]) -> Path:
    """The JSON of this run; with --merge, `prev`'s systems not run now are kept (each with the
    stamp and load average of the run that measured it)."""
    stamp = common.run_stamp()
    for s in systems:
        s.setdefault("run", {"stamp": stamp, "loadavg_before": load_before})
    now = {s["system"] for s in systems}
    kept = [s for s in prev.get("systems", []) if s["system"] not in now]
    for s in kept:
        s.setdefault("run", {"stamp": prev.get("stamp"), "loadavg_before": prev.get("loadavg_before")})
    order = [s["system"] for s in prev.get("systems", [])]
    systems = sorted(kept + systems, key=lambda s: order.index(s["system"]) if s["system"] in order else len(order))
    result = {
        "stamp": stamp,
        "host": host(),
        "loadavg_before": load_before,
        "loadavg_after": common.loadavgs(),
        "config": {"clients": args.clients, "rounds": args.rounds, "model": MODEL, "dataset": "mnist-5k", "local_epochs": 1,
                   "batch_size": 10, "lr": 0.05, "dp_rounds": args.dp_rounds, "quick": args.quick,
                   "clients_per_system": SYSTEM_CLIENTS},
        "versions": common.package_versions(["flwr", "grpcio", "torch", "cryptography", "dp-accounting"]),
        "systems": systems,
        "secagg_cost": cost,
        "dp_curve": dp,
        # the run that measured secagg_cost and dp_curve (an earlier one under --merge --no-extras)
        "extras_run": (prev.get("extras_run") or {"stamp": prev.get("stamp"), "loadavg_before": prev.get("loadavg_before")})
        if prev and args.no_extras else {"stamp": stamp, "loadavg_before": load_before},
        "ratios": ratios(systems),
    }
    out = Path(args.out)
    common.write_json(out, result)
    return out


if __name__ == "__main__":
    main()
