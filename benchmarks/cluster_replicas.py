"""Placement policies on 3 unequal real replicas of this machine, against the simulator's
prediction for the same setup (issue 15: "the same policies for real").

Three `mlsyskit serve` workers on SmolLM2-135M (fp32, one torch thread each, started once) with
unequal KV budgets and contexts, as `mlsyskit serve --replicas 3 --replica-spec ...` would start
them: two small ones (--replica-spec threads=1,kv=1024,ctx=1024: 64 KV blocks) and a large one
(threads=1,kv=8192,ctx=2048). For each policy a fresh `mlsyskit router --policy P --replica-spec
...` is put in front of them (the simulator's policy code; `predict` starts with nothing learned and
learns from the answers), and the open-loop load generator (`mlsyskit.serve.loadgen`) drives it:
two Poisson streams at once, short requests (a Tiny Shakespeare line, --short-tokens new tokens)
and long ones (--long-chars characters of the play, --long-tokens new tokens), on
/v1/completions (plain continuation: the model rarely stops before max_tokens), streamed. Every
prompt starts with a tag unique to the run, so no policy profits from another's prefix cache.

Per policy: goodput (requests that finished with TTFT <= --slo-ttft and time per output token
<= --slo-tpot, per second from the first arrival to the last answer), p50/p99 end-to-end
latency and TTFT, and the requests each replica got (the router's /health counters).

The simulator's prediction: `mlsyskit.cluster.local.local_cluster` turns the three replica
specs and a calibration of this machine (--calibration: `mlsyskit cluster calibrate`'s TOML,
measured with the threads its JSON records) into a 3-instance cluster; the measured run's own
requests (arrival times, prompt tokens by the model's tokenizer, tokens generated) are
simulated under the same policy (`predict` without moving requests, as the router cannot); the
two are set side by side with the relative error. Goodput is also given at the SLO scaled by
0.5, 2 and 4 (on a shared machine one SLO can sit where every policy passes or every one fails).

Naive / ours / peer: round-robin and least outstanding tokens (the router's old rule) are the
naive placements; length-class, predict and oracle are ours. (No peer router is installed.)

Run (exclusive: it times things; < 6 minutes):
  flock -x /tmp/quiet.lock .venv/bin/python benchmarks/cluster_replicas.py
Results: benchmarks/results/cluster_replicas.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

REPLICAS = ("threads=1,kv=1024,ctx=1024", "threads=1,kv=1024,ctx=1024", "threads=1,kv=8192,ctx=2048")
SLO_SCALES = (0.5, 1.0, 2.0, 4.0)  # goodput at the SLO times each (DistServe's SLO-scale reading)
POLICIES = ("round-robin", "lot", "length-class", "predict", "oracle")
READY = re.compile(r"^serving (\S+) on (http://\S+) ", re.M)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: %(default)s)")
    p.add_argument("--replica-spec", nargs="+", default=list(REPLICAS), metavar="SPEC")
    p.add_argument("--duration", type=float, default=36.0, help="seconds of arrivals per policy (default: 36)")
    p.add_argument("--short-rate", type=float, default=0.3, help="short requests per second (default: 0.3)")
    p.add_argument("--long-rate", type=float, default=0.1, help="long requests per second (default: 0.1)")
    p.add_argument("--short-tokens", type=int, default=12)
    p.add_argument("--long-tokens", type=int, default=48)
    p.add_argument("--long-chars", type=int, default=1000, help="characters of a long prompt (default: 1000, ~250 tokens)")
    p.add_argument("--slo-ttft", type=float, default=3.0, help="seconds (default: 3)")
    p.add_argument("--slo-tpot", type=float, default=0.5, help="seconds per output token after the first (default: 0.5)")
    p.add_argument("--calibration", default=str(common.RESULTS / "cluster_calibration.toml"))
    p.add_argument("--cores", type=int, default=None, help="cores the replicas share (default: this process's CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (default: 120)")
    p.add_argument("--out", default=str(common.RESULTS / "cluster_replicas.json"))
    p.add_argument("--sim-only", default=None, metavar="JSON", help="recompute the simulated side of a saved run (no servers)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# The workload
# ------------------------------------------------------------------------------------------


def shakespeare() -> str:
    path = common.SHARED_DATA / "shakespeare" / "input.txt"
    return path.read_text(encoding="utf-8")


def prompt_pools(text: str, long_chars: int, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Short prompts (one line of verse) and long ones (a passage), ``n`` of each."""
    rng = np.random.default_rng(seed)
    lines = [ln.strip() for ln in text.splitlines() if 30 <= len(ln.strip()) <= 80]
    short = [lines[i] for i in rng.choice(len(lines), size=n, replace=False)]
    starts = rng.integers(0, len(text) - long_chars - 1, size=n)
    long = [" ".join(text[s : s + long_chars].split()) for s in starts]
    return short, long


def tagged(prompts: list[str], tag: str) -> list[str]:
    """A tag unique to the run in front of each prompt: no prefix-cache hit across runs."""
    return [f"[{tag}-{i}] {p}" for i, p in enumerate(prompts)]


async def drive(url: str, model: str, args: argparse.Namespace, short: list[str], long: list[str]) -> list[dict[str, Any]]:
    """Both Poisson streams at once; every record with its class and its arrival."""
    from mlsyskit.serve.loadgen import run_load_async

    common_kw = {"endpoint": "completions", "stream": True, "keep_records": True, "timeout": args.timeout, "temperature": 0.0,
                 "model": model}
    rs, rl = await asyncio.gather(
        run_load_async(url, args.short_rate, args.duration, prompts=short, max_tokens=args.short_tokens, seed=args.seed, **common_kw),
        run_load_async(url, args.long_rate, args.duration, prompts=long, max_tokens=args.long_tokens, seed=args.seed + 7, **common_kw),
    )
    records = [{**r, "klass": "short", "max_tokens": args.short_tokens} for r in rs["records"]]
    records += [{**r, "klass": "long", "max_tokens": args.long_tokens} for r in rl["records"]]
    return sorted(records, key=lambda r: r["arrival"])


def measured_stats(records: list[dict[str, Any]], slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    """Goodput and latencies of a measured run (the simulator's definitions, cluster.metrics);
    goodput also at the SLO scaled by each of SLO_SCALES."""
    ok = [r for r in records if r["status"] == 200 and r["error"] is None and r["ttft"] is not None]
    for r in ok:
        r["tpot"] = (r["latency"] - r["ttft"]) / (r["tokens"] - 1) if r["tokens"] > 1 else 0.0
    start = min(r["arrival"] for r in records)
    end = max(r["arrival"] + r["latency"] for r in records if r["latency"] is not None)
    span = max(end - start, 1e-9)

    def attaining(k: float) -> int:
        return sum(1 for r in ok if r["ttft"] <= k * slo_ttft and r["tpot"] <= k * slo_tpot)

    attained = attaining(1.0)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok]
    out = {
        "requests": len(records), "completed": len(ok), "slo_attained": int(attained),
        "goodput_req_s": round(attained / span, 4), "slo_attainment": round(attained / max(len(records), 1), 4),
        "goodput_by_slo_scale": {str(k): round(attaining(k) / span, 4) for k in SLO_SCALES},
        "throughput_tok_s": round(sum(r["tokens"] for r in ok) / span, 3), "span_s": round(span, 2),
        "e2e_p50": common.percentile(lat, 50), "e2e_p99": common.percentile(lat, 99),
        "ttft_p50": common.percentile(ttft, 50), "ttft_p99": common.percentile(ttft, 99),
    }
    for k in ("short", "long"):
        sel = [r for r in ok if r["klass"] == k]
        out[f"{k}_e2e_p50"] = common.percentile([r["latency"] for r in sel], 50)
        out[f"{k}_ttft_p99"] = common.percentile([r["ttft"] for r in sel], 99)
    return out


# ------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_workers(specs: list[Any], logdir: Path) -> list[tuple[Any, str]]:
    """One `mlsyskit serve` per spec, with the flags `serve --replicas --replica-spec` gives it."""
    from mlsyskit.serve.replicas import KV_BLOCK_TOKENS

    procs = []
    for i, s in enumerate(specs):
        threads = max(1, round(s.threads))
        flags = ["--port", "0", "--threads", str(threads), "--num-kv-blocks", str(max(1, s.kv_tokens // KV_BLOCK_TOKENS)),
                 "--max-model-len", str(s.max_model_len), "--log-level", "warning"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        log = logdir / f"replica{i}.log"
        procs.append((common.spawn_logged([sys.executable, "-m", "mlsyskit", "serve", *flags], log, env), log))
    out = []
    for proc, log in procs:
        m = common.wait_for_output(proc, log, READY, 300)
        if m is None:
            for p, _ in procs:
                common.stop_process(p, grace=10)
            raise RuntimeError(f"a replica did not start:\n{log.read_text(errors='replace')[-2000:]}")
        out.append((proc, m.group(2)))
    return out


def start_router(urls: list[str], policy: str, spec_texts: list[str], logdir: Path) -> tuple[Any, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlsyskit", "router", "--backends", *urls, "--port", str(port), "--policy", policy,
           "--replica-spec", *spec_texts, "--health-interval", "0.5"]
    log = logdir / f"router_{policy}.log"
    proc = common.spawn_logged(cmd, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # its ready line comes before it listens
        try:
            health(url)
            return proc, url
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    common.stop_process(proc, grace=5)
    raise RuntimeError(f"the router did not start:\n{log.read_text(errors='replace')[-2000:]}")


def health(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/health", timeout=10, trust_env=False).json()


def wait_idle(urls: list[str], timeout: float = 120.0) -> None:
    """Until no replica has anything queued or running (the last run's leftovers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(not (h := health(u)).get("queue_depth") and not h.get("running") for u in urls):
                return
        except Exception:  # noqa: BLE001 - a busy replica may miss one poll
            pass
        time.sleep(0.5)


def warm_up(urls: list[str]) -> str:
    """One small request to each replica (first calls allocate); the model id they serve."""
    import httpx

    model = ""
    for u in urls:
        model = httpx.get(u + "/v1/models", timeout=30, trust_env=False).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Warm up: the first calls allocate.", "max_tokens": 4, "temperature": 0}
        httpx.post(u + "/v1/completions", json=body, timeout=300, trust_env=False).raise_for_status()
    return model


# ------------------------------------------------------------------------------------------
# The simulator's side
# ------------------------------------------------------------------------------------------


def tokenizer() -> Any:
    from mlsyskit.engine import default_model_path
    from mlsyskit.models.gguf_loader import GGUFFile
    from mlsyskit.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFFile(default_model_path()).metadata)


def simulate_run(records: list[dict[str, Any]], policy: str, spec_texts: list[str], calibration: Path, cores: int,
                 slo_ttft: float, slo_tpot: float, seed: int, tok: Any) -> dict[str, Any]:
    """The measured run's requests in the simulator, on the replicas' twin cluster."""
    from mlsyskit.cluster.local import local_cluster
    from mlsyskit.cluster.metrics import summarize
    from mlsyskit.cluster.policies import make_policy
    from mlsyskit.cluster.routing import parse_replica_spec
    from mlsyskit.cluster.sim import simulate
    from mlsyskit.cluster.spec import SLO, load_spec
    from mlsyskit.cluster.workload import Workload

    base = load_spec(calibration)
    cal_json = calibration.with_suffix(".json")
    threads = json.loads(cal_json.read_text()).get("threads", 2) if cal_json.is_file() else 2
    spec = local_cluster(base, [parse_replica_spec(t) for t in spec_texts], cores=cores, calibrated_threads=threads,
                         slo=SLO(slo_ttft, slo_tpot))
    done = [r for r in records if r["status"] == 200 and r["tokens"] > 0]
    t0 = min(r["arrival"] for r in done)
    wl = Workload([r["arrival"] - t0 for r in done], [len(tok.encode(r["prompt"])) for r in done],
                  [int(r["tokens"]) for r in done], [r["klass"] for r in done], lengths_known=True)
    # the router places but cannot move a running request: predict without its recovery
    res = simulate(spec, wl, make_policy(policy, seed, **({"recover": False} if policy == "predict" else {})))
    s = summarize(res, spec.slo)
    keep = ("requests", "completed", "goodput_req_s", "slo_attainment", "throughput_tok_s", "span_s", "e2e_p50", "e2e_p99",
            "ttft_p50", "ttft_p99", "preemptions")
    out = {k: s[k] for k in keep}
    out["goodput_by_slo_scale"] = {str(k): summarize(res, SLO(k * slo_ttft, k * slo_tpot))["goodput_req_s"] for k in SLO_SCALES}
    out["per_replica_requests"] = [x["requests"] for x in s["per_instance"]]
    out["calibrated_threads"] = threads
    return out


def rel_errors(sim: dict[str, Any], real: dict[str, Any]) -> dict[str, float | None]:
    keys = ("goodput_req_s", "throughput_tok_s", "e2e_p50", "e2e_p99", "ttft_p50", "ttft_p99")
    return {k: round((sim[k] - real[k]) / real[k], 3) if sim.get(k) is not None and real.get(k) else None for k in keys}


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = rep["runs"]
    names = [r["policy"] for r in runs]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in ((axes[0], "goodput_req_s", "goodput (SLO-attaining req/s)"),
                           (axes[1], "e2e_p50", "p50 end-to-end latency (s)"), (axes[2], "e2e_p99", "p99 end-to-end latency (s)")):
        ax.bar(x - 0.2, [r["measured"][key] or 0 for r in runs], 0.4, label="measured")
        ax.bar(x + 0.2, [r["simulated"][key] or 0 for r in runs], 0.4, label="simulated")
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"3 unequal replicas ({', '.join(rep['replica_specs'])}), load avg {rep['host']['loadavg_start']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = args.cores or common.usable_cpus()
    calibration = Path(args.calibration)
    tok = tokenizer()
    out = Path(args.out)
    if args.sim_only:  # recompute the simulated side of a saved run
        rep = json.loads(Path(args.sim_only).read_text())
        for run in rep["runs"]:
            run["simulated"] = simulate_run(run["records"], run["policy"], rep["replica_specs"], calibration, cores,
                                            args.slo_ttft, args.slo_tpot, args.seed, tok)
            run["relative_error"] = rel_errors(run["simulated"], run["measured"])
        out.write_text(json.dumps(rep, indent=1))
        plot(rep, out.with_suffix(".png"))
        return 0
    from mlsyskit.cluster.routing import parse_replica_spec

    specs = [parse_replica_spec(t) for t in args.replica_spec]
    policies = [p for p in args.policies.split(",") if p]
    n_pool = 400
    short_pool, long_pool = prompt_pools(shakespeare(), args.long_chars, n_pool, args.seed)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"cluster_replicas_{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    host = {"cpu": common.cpu_model(), "cpus": cores,
            "loadavg_start": common.loadavgs()}
    print(f"[cluster_replicas] starting 3 replicas ({' | '.join(args.replica_spec)}), load {host['loadavg_start']}", flush=True)
    workers = start_workers(specs, logdir)
    urls = [u for _, u in workers]
    runs = []
    try:
        model = warm_up(urls)
        for k, policy in enumerate(policies):
            wait_idle(urls)
            router, rurl = start_router(urls, policy, args.replica_spec, logdir)
            try:
                before = {b["url"]: b["requests"] for b in health(rurl)["backends"]}
                load0 = common.loadavg()
                t = time.perf_counter()
                records = asyncio.run(drive(rurl, model, args, tagged(short_pool, f"{k}s"), tagged(long_pool, f"{k}l")))
                wall = time.perf_counter() - t
                h = health(rurl)
            finally:
                common.stop_process(router, grace=10)
            per_replica = [b["requests"] - before.get(b["url"], 0) for b in sorted(h["backends"], key=lambda b: urls.index(b["url"]))]
            measured = measured_stats(records, args.slo_ttft, args.slo_tpot)
            measured["per_replica_requests"] = per_replica
            measured["errors"] = sum(1 for r in records if r["status"] != 200 or r["error"] is not None)
            sim = simulate_run(records, policy, args.replica_spec, calibration, cores, args.slo_ttft, args.slo_tpot, args.seed, tok)
            runs.append({"policy": policy, "measured": measured, "simulated": sim, "relative_error": rel_errors(sim, measured),
                         "wall_s": round(wall, 1), "loadavg_1m": [load0, common.loadavg()], "router_policy": h.get("policy"),
                         "records": [{k: r.get(k) for k in ("arrival", "klass", "prompt", "max_tokens", "status", "error", "ttft",
                                                            "latency", "tokens")} for r in records]})
            m = measured
            print(f"[cluster_replicas] {policy:12s} goodput {m['goodput_req_s']:.3f} req/s ({m['slo_attained']}/{m['requests']}), "
                  f"p50 {m['e2e_p50']} s, p99 {m['e2e_p99']} s, per replica {per_replica}; simulated goodput "
                  f"{sim['goodput_req_s']:.3f}, p50 {sim['e2e_p50']} s, per replica {sim['per_replica_requests']}; load {common.loadavg()}",
                  flush=True)
    finally:
        for proc, _ in workers:
            common.stop_process(proc, grace=20)
    host["loadavg_end"] = common.loadavgs()
    rep = {
        "benchmark": "cluster_replicas", **common.run_stamp(), "host": host, "replica_specs": list(args.replica_spec),
        "workload": {"duration_s": args.duration, "short": {"rate": args.short_rate, "max_tokens": args.short_tokens, "prompt": "a line of Tiny Shakespeare"},
                     "long": {"rate": args.long_rate, "max_tokens": args.long_tokens, "prompt": f"{args.long_chars} characters of Tiny Shakespeare"},
                     "endpoint": "/v1/completions, streamed, greedy", "seed": args.seed},
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "calibration": str(calibration), "cores": cores,
        "runs": runs, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1))
    plot(rep, out.with_suffix(".png"))
    print(f"[cluster_replicas] wrote {out} and {out.with_suffix('.png')} in {rep['wall_s']} s", flush=True)
    return 0




if __name__ == "__main__":
    sys.exit(main())
