"""`mlsyskit cluster simulate|report|calibrate`: the heterogeneous-cluster simulator.

Imported on every `mlsyskit` invocation: nothing heavy at module level (the simulator, numpy
and matplotlib are imported inside the handlers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlsyskit.runtime import add_progress_flag, json_dumps, show_progress


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v

    return parse


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates like 0.5,1,2, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers, got {text!r}")
    return rates


def register(sub: argparse._SubParsersAction) -> None:
    """Add `mlsyskit cluster` and its subcommands to the top-level parser."""
    c = sub.add_parser(
        "cluster",
        help="simulate LLM serving on a heterogeneous GPU cluster: cost model, workloads, placement policies",
        description="A discrete-event simulator of engine instances (continuous batching, paged KV, preemption, "
        "tensor parallelism) on a cluster described in TOML, with pluggable placement policies.",
    )
    csub = c.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", parser_class=type(c))
    csub.required = True

    s = csub.add_parser(
        "simulate",
        help="simulate one policy (or all) on a spec; prints one JSON object (a list for --policy all) on its last line",
        description="Simulate the spec's workload under a placement policy. The last line of stdout is a JSON object "
        "with policy, rate, requests, completed, throughput_tok_s, goodput_req_s, slo_attainment, ttft_p50, ttft_p99, "
        "tpot_p50, e2e_p99, preemptions, sim_wall_s (a list of them for --policy all).",
    )
    s.add_argument("spec", metavar="SPEC.toml", help="cluster, model, workload and SLO (see examples/q11.toml)")
    s.add_argument("--policy", default="lot", metavar="NAME",
                   help="random, round-robin, jsq, lot, length-class, best-fit, oracle, predict, predict-norecover, or all (default: lot)")
    s.add_argument("--rate", type=_positive(float), default=None, metavar="R", help="arrival rate in requests/s (default: the spec's)")
    s.add_argument("--requests", type=_positive(int), default=None, metavar="N", help="number of requests (default: the spec's)")
    s.add_argument("--seed", type=int, default=None, metavar="S", help="workload and policy seed (default: the spec's, else 0)")
    s.add_argument("--lengths", choices=("known", "unknown"), default=None,
                   help="whether clients send the true output length as max_tokens (default: the spec's, else known)")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="also write summary.json, per-request CSV (TTFT, TPOT, end-to-end) and per-instance memory and "
                   "utilisation timelines (PNG, JSON) for each policy (default: off)")
    add_progress_flag(s, "policies")
    s.set_defaults(func=_simulate, interrupted="interrupted; nothing written")

    r = csub.add_parser(
        "report",
        help="every policy at rising arrival rates, known and unknown output lengths: table, goals, plot",
        description="Every policy at rising arrival rates on the spec's cluster, first with output lengths known, then "
        "unknown: goodput at the SLO, p99 latencies, preemptions, mispredictions; the issue's goals checked; a JSON "
        "report, a plot (same name, .png) and memory/utilisation timelines next to it.",
    )
    r.add_argument("spec", metavar="SPEC.toml", help="cluster, model, workload and SLO (see examples/q11.toml)")
    r.add_argument("--rates", type=_rates, default=None, metavar="R1,R2,...",
                   help="arrival rates (default: 0.25,0.5,0.75,1,1.5,2,2.5,3,3.5,4)")
    r.add_argument("--requests", type=_positive(int), default=3000, metavar="N", help="requests per run (default: 3000)")
    r.add_argument("--seed", type=int, default=0, metavar="S", help="workload and policy seed (default: 0)")
    r.add_argument("--speed-requests", type=_positive(int), default=100_000, metavar="N",
                   help="requests of the simulator speed measurement (default: 100000)")
    r.add_argument("--out", default=None, metavar="JSON",
                   help="report file; the plot and timelines go next to it (default: runs/cluster/NAME_report.json)")
    add_progress_flag(r, "runs")
    r.set_defaults(func=_report, interrupted="interrupted; no report written")

    k = csub.add_parser(
        "calibrate",
        help="measure the engine's step times on this machine, fit the cost model, replay the engine benchmark's workload",
        description="Measure prefill and decode step times of mlsyskit's engine (the embedded SmolLM2-135M) across batch "
        "sizes and context lengths on this CPU, fit the cost model's peak rates and overheads, then serve a Poisson "
        "workload shaped like benchmarks/engine_throughput.py's with the real engine and in the simulator, and compare "
        "throughput and latency percentiles. Writes a JSON report and the fitted spec (TOML) next to it.",
    )
    k.add_argument("--requests", type=_positive(int), default=32, metavar="N", help="requests of the replayed workload (default: 32)")
    k.add_argument("--rate", type=_positive(float), default=None, metavar="R",
                   help="its Poisson rate in requests/s (default: 0.7 x what the fitted model says one engine sustains)")
    k.add_argument("--threads", type=_positive(int), default=2, metavar="N", help="torch threads (default: 2)")
    k.add_argument("--quick", action="store_true", help="a smaller grid of step measurements and 8 requests (a smoke run)")
    k.add_argument("--seed", type=int, default=0, metavar="S", help="workload seed (default: 0)")
    k.add_argument("--out", default="runs/cluster/calibration.json", metavar="JSON",
                   help="report file; the fitted spec goes next to it as .toml (default: runs/cluster/calibration.json)")
    add_progress_flag(k, "measurements")
    k.set_defaults(func=_calibrate, interrupted="interrupted; no calibration written")


def _simulate(args: argparse.Namespace) -> int:
    from mlsyskit.cluster.report import policy_names, run_one, write_run
    from mlsyskit.cluster.spec import load_spec

    spec = load_spec(args.spec)
    names = policy_names(args.policy)
    runs = []
    progress = show_progress(args.progress)
    for name in names:
        s, res = run_one(spec, name, rate=args.rate, requests=args.requests, seed=args.seed, lengths=args.lengths)
        runs.append((s, res))
        if progress:
            print(f"{name}: goodput {s['goodput_req_s']} req/s, SLO attainment {s['slo_attainment']}, "
                  f"simulated in {s['sim_wall_s']} s", file=sys.stderr, flush=True)
    if args.out:
        files = write_run(Path(args.out), spec, runs)
        print(f"wrote {len(files)} files to {args.out}/ (summary.json, requests_*.csv, timeline_*.png)", file=sys.stderr)
    from mlsyskit.cluster.metrics import headline

    heads = [headline(s) for s, _ in runs]
    print(json_dumps(heads if args.policy == "all" else heads[0]))
    return 0


def _report(args: argparse.Namespace) -> int:
    from mlsyskit.cluster.report import DEFAULT_RATES, format_table, make_report
    from mlsyskit.cluster.spec import load_spec

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("runs/cluster") / f"{spec.name}_report.json"
    rep = make_report(spec, rates=args.rates or DEFAULT_RATES, requests=args.requests, seed=args.seed,
                      big_requests=args.speed_requests, out=out, progress=show_progress(args.progress))
    print(format_table(rep["known_lengths"], "output lengths known"))
    print()
    print(format_table(rep["unknown_lengths"], "output lengths unknown"))
    print()
    print(json_dumps(rep["goals"], indent=1))
    print(f"report written to {out} and {rep['png']} in {rep['wall_s']} s")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from mlsyskit.cluster.calibrate import run_calibration

    rep = run_calibration(out=Path(args.out), requests=args.requests, rate=args.rate, threads=args.threads,
                          quick=args.quick, seed=args.seed, progress=show_progress(args.progress))
    print(json_dumps(rep["comparison"]))
    return 0
