"""`mlsyskit fl server|client|launch|collective`: federated learning across processes (gRPC or
torch.distributed).

Imported on every `mlsyskit` invocation: nothing heavy at module level (grpc, torch and the
round loop are imported inside the handlers). The server takes every round and strategy flag
of `mlsyskit fedavg` (generated from `FLConfig`, as there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError
from mlsyskit.fl.config import AGGREGATIONS, FLConfig, aggregation_mode
from mlsyskit.runtime import add_progress_flag, show_progress

FULL = "full"
GRPC_ONLY = "--secagg and --compress need the gRPC transport (fl server / fl launch); the collective transport sends float32 models"
FAULTS = ("nan", "wrong-shape", "garbage", "oversize", "drop-before-mask", "drop-after-mask")  # mirrors grpc_client.FAULTS (kept light)


def _batch_size(text: str) -> int | str:
    if text == FULL:
        return FULL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid batch size {text!r}; give a positive integer or 'full'") from None


def _client_ids(text: str) -> list[int]:
    """--client-id: K, A-B (inclusive) or a comma list of them."""
    ids: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid client id {part!r}; give K, A-B or a comma list such as 0-4,7") from None
        if first < 0 or last < first:
            raise argparse.ArgumentTypeError(f"invalid client id range {part!r}; ids are >= 0 and A <= B")
        ids.extend(range(first, last + 1))
    if len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"client ids repeat in {text!r}")
    return ids


def _fault(text: str) -> tuple[int | None, str]:
    """--fault [K=]KIND: KIND for every client of the process, or for client K only."""
    cid, sep, kind = text.rpartition("=")
    if kind not in FAULTS or (sep and not cid.isdigit()):
        raise argparse.ArgumentTypeError(f"invalid fault {text!r}; give KIND or K=KIND, KIND one of {', '.join(FAULTS)}")
    return (int(cid) if sep else None), kind


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per FLConfig field, as `mlsyskit fedavg` has them."""
    for f in dataclasses.fields(FLConfig):
        default = "full" if f.name == "batch_size" and f.default is None else f.default
        help_text = f.metadata["help"]
        shown = f" (default: {default})" if default is not None else ("" if "default" in help_text else " (default: off)")
        hint = str(f.type)
        if hint == "bool":  # an on/off switch (--secagg)
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true", default=None, help=help_text + " (default: off)")
            continue
        kind = _batch_size if f.name == "batch_size" else int if "int" in hint else float if "float" in hint else str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       metavar=f.metadata.get("metavar", f.name.upper()), help=help_text + shown)


def _config(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """The FLConfig fields given on the command line, and whether --batch-size was 'full'."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FLConfig)}
    full = given["batch_size"] == FULL
    return {k: v for k, v in given.items() if v is not None and v != FULL}, full


def _add_round_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-clients", type=int, default=1, metavar="N",
                   help="a round closes at its deadline if at least N sampled clients answered, else it is retried; the first round waits for N clients to join (default: 1)")
    p.add_argument("--wait-for", type=int, default=None, metavar="N",
                   help="clients that must be ready (joined, data loaded) before round 1 (default: --min-clients; fl launch: all)")
    p.add_argument("--round-timeout", type=float, default=60.0, metavar="S", help="seconds a round waits for its clients (default: 60)")
    p.add_argument("--join-timeout", type=float, default=300.0, metavar="S", help="seconds to wait for --min-clients clients to join (default: 300)")
    p.add_argument("--round-retries", type=int, default=2, metavar="K", help="times a round with too few answers is retried before the run stops (default: 2)")


def _server_options(args: argparse.Namespace, address: str, port_file: str | None) -> Any:
    from mlsyskit.fl.grpc_server import ServerOptions, read_tokens

    if args.min_clients < 1:
        raise UserError(f"--min-clients must be at least 1 (got {args.min_clients})")
    if args.round_timeout <= 0 or args.join_timeout <= 0:
        raise UserError("--round-timeout and --join-timeout must be positive")
    if args.wait_for is not None and args.wait_for < 1:
        raise UserError(f"--wait-for must be at least 1 (got {args.wait_for})")
    if args.round_retries < 0:
        raise UserError(f"--round-retries must be >= 0 (got {args.round_retries})")
    insecure = getattr(args, "insecure", True)
    cert, key, tokens = getattr(args, "tls_cert", None), getattr(args, "tls_key", None), getattr(args, "tokens", None)
    if not insecure:
        if not (cert and key):
            raise UserError("the server needs --tls-cert and --tls-key (or --insecure for plaintext, on loopback or a trusted network)")
        if not tokens:
            raise UserError("the server needs --tokens FILE (one 'CLIENT_ID TOKEN' per line), or --insecure")
        for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
            if not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file")
            if b"-----BEGIN " not in Path(path).read_bytes():
                raise UserError(f"{flag} {path}: not a PEM file")
    return ServerOptions(
        address=address,
        min_clients=args.min_clients,
        wait_for=args.wait_for,
        round_timeout=args.round_timeout,
        join_timeout=args.join_timeout,
        round_retries=args.round_retries,
        insecure=insecure,
        tls_cert=cert,
        tls_key=key,
        tokens=read_tokens(tokens) if tokens else None,
        port_file=port_file,
    )


def _print_summary(summary: dict[str, Any]) -> None:
    keys = ("final_accuracy", "best_accuracy", "rounds_run", "bytes_up", "bytes_down", "rejected_updates", "out")
    print(json.dumps({k: summary.get(k) for k in keys}))


def _server(args: argparse.Namespace) -> int:
    opts = _server_options(args, args.address, args.port_file)
    from mlsyskit.fl.grpc_server import GrpcTransport
    from mlsyskit.fl.simulation import resume, run

    given, full = _config(args)
    transport = GrpcTransport(opts)
    progress = show_progress(args.progress)
    if args.resume:
        if full:
            given["batch_size"] = None
        summary = resume(args.resume, given, progress=progress, transport=transport)
    else:
        cfg = FLConfig(**given)
        if full:
            cfg.batch_size = None
        summary = run(cfg, progress=progress, transport=transport)
    _print_summary(summary)
    return 0


def _client(args: argparse.Namespace) -> int:
    if len(args.client_id) > 1 and not args.insecure:
        raise UserError("a process hosting several --client-id needs --insecure (a --token is one client's)")
    if not args.insecure and not args.tls_ca:
        raise UserError("the client needs --tls-ca (the server's CA certificate) or --insecure for plaintext")
    token = args.token or os.environ.get("MLSYSKIT_FL_TOKEN")
    if not args.insecure and not token:
        raise UserError("the client needs --token (or $MLSYSKIT_FL_TOKEN), or --insecure")
    if args.tls_ca and not Path(args.tls_ca).is_file():
        raise UserError(f"--tls-ca {args.tls_ca}: no such file")
    if args.delay < 0:
        raise UserError(f"--delay must be >= 0 (got {args.delay})")
    faults = dict(args.fault or [])
    stray = sorted(k for k in faults if k is not None and k not in args.client_id)
    if stray:
        raise UserError(f"--fault for client(s) {stray}, which this process does not host (--client-id)")
    from mlsyskit.fl.grpc_client import ClientOptions, run_clients

    results = run_clients(ClientOptions(
        server=args.server, client_id=args.client_id[0], data_dir=args.data_dir, insecure=args.insecure, tls_ca=args.tls_ca,
        token=token, delay=args.delay, fault=faults.get(None), connect_timeout=args.connect_timeout, threads=args.threads,
    ), args.client_id, {k: v for k, v in faults.items() if k is not None})
    for result in results:
        print(json.dumps(result))
    return 0


def _collective(args: argparse.Namespace) -> int:
    """One rank of a torch.distributed run: rank 0 runs the round loop, the others train clients."""
    given, full = _config(args)
    if args.join_timeout <= 0:
        raise UserError("--join-timeout must be positive")
    if not args.resume:  # every rank checks the flags before any waits for the others
        cfg = FLConfig(**given)
        if full:
            cfg.batch_size = None
        if cfg.resolved().secagg or cfg.compress:
            raise UserError(GRPC_ONLY)
        aggregation_mode(cfg.resolved().strategy, args.aggregation)
    from mlsyskit.fl import collective

    rank, world = collective.init(args.join_timeout)
    try:
        if rank != 0:
            print(json.dumps(collective.serve_rank(rank, world)))
            return 0
        from mlsyskit.fl.simulation import resume, run

        transport = collective.CollectiveTransport(args.aggregation)
        progress = show_progress(args.progress)
        if args.resume:
            if full:
                given["batch_size"] = None
            summary = resume(args.resume, given, progress=progress, transport=transport)
        else:
            summary = run(cfg, progress=progress, transport=transport)
        _print_summary(summary)
        return 0
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _free_port() -> int:
    """A loopback port free now (the processes started next bind it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(processes: int) -> dict[str, str]:
    """This environment with OpenMP threads shared out among ``processes`` processes started
    together (at least 1 each), as torchrun does, unless the user set OMP_NUM_THREADS: with the
    default of one thread per core each process spins on every core (measured here, 3 ranks of
    logreg on 2 cores, 6 rounds: 10.5 s -> 6.3 s; gRPC, 3 clients: 14.3 s -> 10.0 s)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def _launch(args: argparse.Namespace) -> int:
    """A server and one client process per client id on this machine, over loopback."""
    import subprocess

    _server_options(args, "127.0.0.1:0", None)  # check the flags before starting anything
    given, full = _config(args)
    cfg = FLConfig(**given)
    if full:
        cfg.batch_size = None
    if cfg.clients is None:  # fedavg's default (100, or every Shakespeare role) is too many processes to imply
        raise UserError("fl launch needs --clients N (it starts one process per client)")
    n = cfg.resolved().clients or 0
    argv = [sys.executable, "-m", "mlsyskit", "fl"]
    flags = []
    for k, v in given.items():
        if isinstance(v, bool):  # an on/off switch (--secagg) takes no value
            flags += ["--" + k.replace("_", "-")] if v else []
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    if full:
        flags += ["--batch-size", FULL]
    if args.transport == "torchdist":
        if cfg.secagg or cfg.compress:  # refused here too, before any rank starts
            raise UserError(GRPC_ONLY)
        aggregation_mode(cfg.resolved().strategy, args.aggregation)
        if args.clients_per_process != 1:
            raise UserError("--clients-per-process is for --transport grpc (ranks get clients round-robin: --ranks)")
        return _launch_ranks(args, argv, flags, args.ranks or n + 1)
    if args.ranks is not None or args.aggregation != "auto":
        raise UserError("--ranks and --aggregation are for --transport torchdist")
    if args.clients_per_process < 1:
        raise UserError(f"--clients-per-process must be at least 1 (got {args.clients_per_process})")
    # The port is picked here, not by the server (--address :0 and a port file), so the client
    # processes start with the server instead of after it: each pays its own python + torch
    # import (seconds) while the server loads, and retries until it listens (--connect-timeout).
    port = _free_port()
    env = _child_env(1 + -(-n // args.clients_per_process))
    server = subprocess.Popen(
        [*argv, "server", "--insecure", "--address", f"127.0.0.1:{port}",
         "--min-clients", str(args.min_clients), "--round-timeout", str(args.round_timeout),
         "--wait-for", str(args.wait_for or n),
         "--join-timeout", str(args.join_timeout), "--round-retries", str(args.round_retries),
         "--progress" if show_progress(args.progress) else "--no-progress", *flags], env=env,
    )
    clients: list[subprocess.Popen] = []
    rc = 1
    try:
        data = ["--data-dir", cfg.data_dir] if cfg.data_dir else []
        threads = ["--threads", str(cfg.threads)] if cfg.threads else []
        per = args.clients_per_process
        for first in range(0, n, per):
            ids = str(first) if per == 1 else f"{first}-{min(first + per, n) - 1}"
            clients.append(subprocess.Popen(
                [*argv, "client", "--insecure", "--server", f"127.0.0.1:{port}", "--client-id", ids, *data, *threads,
                 "--connect-timeout", str(args.join_timeout)],
                stdout=subprocess.DEVNULL, env=env,
            ))
        rc = server.wait()
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                try:  # told "done" by a server that finished; after a failed one nobody tells them
                    p.wait(timeout=5 if rc == 0 else 0.1)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return rc


def _launch_ranks(args: argparse.Namespace, argv: list[str], flags: list[str], world: int) -> int:
    """`fl collective` ranks 0..world-1 on this machine (torchrun's environment, gloo on loopback)."""
    import subprocess

    if world < 2:
        raise UserError(f"--ranks must be at least 2: the server and a client rank (got {world})")
    port = _free_port()
    procs: list[subprocess.Popen] = []
    rc = 1
    try:
        for rank in range(world):
            env = {**_child_env(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(
                [*argv, "collective", "--join-timeout", str(args.join_timeout), "--aggregation", args.aggregation,
                 "--progress" if show_progress(args.progress) and rank == 0 else "--no-progress", *flags],
                env=env, stdout=None if rank == 0 else subprocess.DEVNULL,
            ))
        rc = procs[0].wait()
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=30 if rc == 0 else 5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return rc


def _add_aggregation_flag(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="auto",
                   help=prefix + "auto: one weighted all_reduce of n_k * update and n_k for the mean-based strategies (fedavg, "
                   "fedprox, fedavgm, fedadam, fedyogi, fedadagrad); a gather of every update to rank 0 for the rules that need "
                   "each one (median, trimmed-mean, krum, multi-krum). gather: always gather (the naive path) (default: auto)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `mlsyskit fl` and its subcommands to the top-level parser."""
    fl = sub.add_parser(
        "fl",
        help="federated learning across processes and machines: a gRPC server and client processes, or torch.distributed ranks",
        description="The round loop of `mlsyskit fedavg` with its clients in other processes over gRPC: "
        "`fl server` (run directory as fedavg's), `fl client` (one per client id), `fl launch` (both on one machine); "
        "or over torch.distributed: `fl collective` (one rank, under torchrun).",
    )
    fsub = fl.add_subparsers(dest="fl_command", metavar="SUBCOMMAND", parser_class=type(fl))
    fsub.required = True
    interrupted = "interrupted; the last checkpoint is kept (fl server --resume DIR continues)"

    s = fsub.add_parser(
        "server",
        help="serve rounds to client processes over gRPC; writes the same run directory as fedavg",
        description="Runs the FedAvg round loop with clients in other processes. Prints one JSON line with the "
        "summary; metrics.jsonl gains real bytes_up/bytes_down and dropped (client ids that missed the deadline).",
    )
    s.add_argument("--address", default="127.0.0.1:9092", metavar="HOST:PORT", help="where to listen; port 0 picks a free one (default: 127.0.0.1:9092)")
    _add_round_flags(s)
    s.add_argument("--insecure", action="store_true", help="plaintext, no certificate or token (loopback demos and tests) (default: off)")
    s.add_argument("--tls-cert", metavar="PEM", default=None, help="server certificate (PEM) (default: off)")
    s.add_argument("--tls-key", metavar="PEM", default=None, help="server private key (PEM) (default: off)")
    s.add_argument("--tokens", metavar="FILE", default=None, help="per-client tokens, one 'CLIENT_ID TOKEN' per line; a wrong token is refused and logged (default: off)")
    s.add_argument("--port-file", metavar="FILE", default=None, help="write the port listened on to FILE (for --address HOST:0) (default: off)")
    s.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR from its last checkpoint (default: off)")
    _add_config_flags(s)
    add_progress_flag(s, "rounds")
    s.set_defaults(func=_server, interrupted=interrupted)

    c = fsub.add_parser(
        "client",
        help="one client process: joins the server, trains its own partition each round it is sampled",
        description="Gets the run's config from the server, loads the data and keeps only its own partition "
        "(same partitioner and seed as the server), trains with fedavg's client code and sends its model. "
        "Prints one JSON line (per hosted client) when the server ends the run.",
    )
    c.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    c.add_argument("--client-id", type=_client_ids, required=True, metavar="K",
                   help="this client's id, 0..N-1; or several (A-B, or a comma list: 0-4,7), hosted by this process "
                   "as separate clients (a thread, a gRPC session, keys and partition each; one data load; --insecure only)")
    c.add_argument("--data-dir", default=None, metavar="DIR", help="folder with the data files (default: as fedavg finds them)")
    c.add_argument("--insecure", action="store_true", help="plaintext, no certificate or token (default: off)")
    c.add_argument("--tls-ca", metavar="PEM", default=None, help="CA certificate that signed the server's (default: off)")
    c.add_argument("--token", default=None, help="this client's token (default: $MLSYSKIT_FL_TOKEN)")
    c.add_argument("--connect-timeout", type=float, default=60.0, metavar="S", help="keep retrying an unreachable server this long (default: 60)")
    c.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: the run's --threads)")
    c.add_argument("--delay", type=float, default=0.0, metavar="S", help="fault injection: sleep S seconds before sending each update (default: 0)")
    c.add_argument("--fault", type=_fault, action="append", default=None, metavar="[K=]KIND",
                   help=f"fault injection: send a bad update, or die at a point of --secagg ({', '.join(FAULTS)}); K=KIND for "
                   "hosted client K only; repeatable (default: off)")
    c.set_defaults(func=_client, interrupted="interrupted")

    la = fsub.add_parser(
        "launch",
        help="a server and one client process per client on this machine (plaintext loopback)",
        description="Starts `fl server --insecure` on a free loopback port and `fl client` for ids 0..N-1 "
        "(N = --clients), and waits for the run to finish. Takes the server's flags.",
    )
    la.add_argument("--transport", choices=("grpc", "torchdist"), default="grpc",
                    help="grpc: a server and client processes; torchdist: `fl collective` ranks over torch.distributed (gloo) (default: grpc)")
    la.add_argument("--ranks", type=int, default=None, metavar="W",
                    help="--transport torchdist: processes, the server and W-1 client ranks (default: --clients + 1)")
    _add_aggregation_flag(la, "--transport torchdist: ")
    la.add_argument("--clients-per-process", type=int, default=1, metavar="M",
                    help="--transport grpc: each client process hosts M clients (fl client --client-id A-B), for many "
                    "clients on one machine (default: 1)")
    _add_round_flags(la)
    _add_config_flags(la)
    add_progress_flag(la, "rounds")
    la.set_defaults(func=_launch, interrupted=interrupted)

    co = fsub.add_parser(
        "collective",
        help="one rank of a torch.distributed run (under torchrun): rank 0 the server, the others clients",
        description="Cross-silo mode: `torchrun --nproc-per-node W -m mlsyskit fl collective ...`. Rank 0 runs the "
        "round loop of fedavg (same run directory), broadcasts the model over gloo and aggregates with one weighted "
        "all_reduce (mean-based strategies) or a gather to rank 0 (median, trimmed-mean, krum, multi-krum); clients "
        "are dealt round-robin to ranks 1..W-1. No deadlines: every rank must stay up.",
    )
    co.add_argument("--join-timeout", type=float, default=300.0, metavar="S",
                    help="timeout of the process group: for all ranks to start, and for any one collective (default: 300)")
    _add_aggregation_flag(co, "")
    co.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR from its last checkpoint (rank 0) (default: off)")
    _add_config_flags(co)
    add_progress_flag(co, "rounds")
    co.set_defaults(func=_collective, interrupted=interrupted)
