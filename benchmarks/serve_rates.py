"""Serving under rising request rates: per-request baseline, window batching, continuous
batching and 2 replicas behind the router, each a real `mlsyskit serve` on SmolLM2-135M.

For each configuration (--configs) a server is started on a free loopback port with 2 CPU
threads in total, warmed up with two requests, then driven by the open-loop load generator
(`mlsyskit.serve.loadgen.run_load`, Poisson arrivals, streamed chat completions, greedy,
--max-tokens new tokens at most) at rising offered rates: --start-rate, then x --factor each
step, --step-seconds of arrivals per step. A step *meets the bound* when its p99 end-to-end
latency (counted from each request's scheduled arrival, so queueing is included) is at most
--bound seconds and at most --max-error-rate of its requests failed (HTTP errors, 429s, timeouts).
The stepping stops after the first step that misses the bound (the configuration has
saturated), or at --max-rate. The **sustainable rate** of a configuration is the highest offered
rate whose step met the bound. Between steps the server is left to drain (/health idle).

  baseline     --batching none: one request at a time (the course's original service)
  window       --batching window --max-batch-size 8 --max-wait-ms 50: the course's queue batching
  continuous   the engine's continuous batching (requests join the running batch every step)
  replicas2    --replicas 2: two 1-thread engine processes behind the router

Prompts: short chat requests built from Tiny Shakespeare lines (through mlsyskit.data, when
the file is in the data folder; else the load generator's embedded questions).

Goal (issue 6): sustainable rate of continuous batching >= 4x the per-request baseline.

Results: benchmarks/results/serve_rates.json and serve_rates.png (p50 and p99 latency vs
offered rate, one colour per configuration, the bound drawn). --quick writes *_quick.* files.
Run:  .venv/bin/python benchmarks/serve_rates.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, however started
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_OUT = common.RESULTS / "serve_rates.json"
QUICK_OUT = common.RESULTS / "serve_rates_quick.json"

CONFIGS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("per-request baseline (--batching none)", ["--batching", "none", "--threads", "2"]),
    "window": ("window batching (max batch 8, max wait 50 ms)", ["--batching", "window", "--max-batch-size", "8", "--max-wait-ms", "50", "--threads", "2"]),
    "continuous": ("continuous batching", ["--batching", "continuous", "--threads", "2"]),
    "replicas2": ("2 replicas x 1 thread behind the router", ["--replicas", "2", "--threads", "2"]),
}
COLORS = {"baseline": "tab:gray", "window": "tab:orange", "continuous": "tab:green", "replicas2": "tab:blue"}
GOAL_CONTINUOUS_VS_BASELINE = 4.0

# --quick: a smoke run of a few minutes (explicit flags still win)
QUICK = {"step_seconds": 6.0, "start_rate": 0.5, "factor": 2.0, "max_steps": 2, "bound": 20.0}

READY = re.compile(r"^serving (\S+) on (http://\S+) ", re.M)


def load_prompts(data_dir: str | None, n: int, seed: int) -> tuple[list[str], str]:
    """Short chat prompts from Tiny Shakespeare lines, else the load generator's embedded list."""
    from mlsyskit.errors import UserError
    from mlsyskit.serve.loadgen import DEFAULT_PROMPTS

    try:
        from mlsyskit.data.paths import resolve_data_dir
        from mlsyskit.data.shakespeare import locate_shakespeare

        folder = resolve_data_dir(data_dir)
        if folder is None and common.SHARED_DATA.is_dir():
            folder = common.SHARED_DATA
        path = locate_shakespeare(folder, download_missing=False)
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (UserError, OSError, UnicodeDecodeError) as e:
        return list(DEFAULT_PROMPTS), f"embedded questions (Tiny Shakespeare unavailable: {e})"
    verse = [ln for ln in lines if 30 <= len(ln) <= 90 and not ln.endswith(":")]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(verse), size=min(n, len(verse)), replace=False)
    prompts = [f"Continue this line of verse in a few words: {verse[i]}" for i in picked]
    return prompts, f"Tiny Shakespeare lines from {path}"


class Server:
    """`python -m mlsyskit serve ...` in a subprocess; ready once it printed its ready line."""

    def __init__(self, flags: list[str], log: Path, env: dict[str, str], timeout: float = 300.0) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "mlsyskit", "serve", "--port", "0", "--log-level", "warning", *flags]
        self.t0 = time.perf_counter()
        self.proc = common.spawn_logged(cmd, log, env)
        m = common.wait_for_output(self.proc, log, READY, timeout)
        if m is None:
            self.stop()
            raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        self.ready_s = time.perf_counter() - self.t0
        self.model, self.url = m.group(1), m.group(2)

    def wait_idle(self, timeout: float = 120.0) -> bool:
        """Until /health reports nothing queued or running (leftovers of the last step)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = httpx.get(self.url + "/health", timeout=5).json()
                if not h.get("queue_depth") and not h.get("running"):
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        return False

    def stop(self) -> int | None:
        return common.stop_process(self.proc, grace=90)


def warm_up(url: str, model: str, prompts: list[str], max_tokens: int) -> None:
    import httpx

    for p in prompts[:2]:
        body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0}
        httpx.post(url + "/v1/chat/completions", json=body, timeout=300).raise_for_status()


def run_config(name: str, args: argparse.Namespace, prompts: list[str], env: dict[str, str], logdir: Path) -> dict[str, Any]:
    from mlsyskit.serve.loadgen import run_load

    label, flags = CONFIGS[name]
    flags = [*flags, "--max-model-len", str(args.max_model_len)] + (["--model", args.model] if args.model else [])
    print(f"[serve_rates] {name}: starting `mlsyskit serve {' '.join(flags)}`", flush=True)
    server = Server(flags, logdir / f"{name}.log", env)
    out: dict[str, Any] = {"label": label, "flags": flags, "ready_s": round(server.ready_s, 2), "model": server.model, "steps": []}
    try:
        warm_up(server.url, server.model, prompts, args.max_tokens)
        rate, step = args.start_rate, 0
        while step < args.max_steps and rate <= args.max_rate * (1 + 1e-9):
            server.wait_idle()
            load_before = common.loadavg()
            r = run_load(
                server.url, rate, args.step_seconds, arrival="poisson", prompts=prompts, endpoint="chat",
                max_tokens=args.max_tokens, stream=True, seed=args.seed + step, timeout=args.timeout,
                model=server.model, max_in_flight=args.max_in_flight,
            )
            r["load_average_before"] = load_before
            r["meets_bound"] = bool(r["ok"] > 0 and r["latency_p99_s"] is not None and r["latency_p99_s"] <= args.bound and r["error_rate"] <= args.max_error_rate)
            out["steps"].append(r)
            print(f"[serve_rates] {name}: rate {rate:.3g} req/s -> {r['ok']}/{r['sent']} ok, "
                  f"p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s, errors {r['error_rate']:.1%}, "
                  f"{r['output_tok_s']} tok/s{'' if r['meets_bound'] else '  (over the bound: saturated)'}", flush=True)
            if not r["meets_bound"]:
                out["stopped_by"] = "bound"
                break
            rate *= args.factor
            step += 1
        else:
            out["stopped_by"] = "max_steps" if step >= args.max_steps else "max_rate"
        good = [s["offered_rate"] for s in out["steps"] if s["meets_bound"]]
        out["sustainable_rate"] = max(good) if good else 0.0
        out["saturated"] = out["stopped_by"] == "bound"  # else the sustainable rate is only a lower bound
        if name == "replicas2":
            out["replica_cold_starts"] = [float(x) for x in re.findall(r"cold start ([\d.]+) s", server.log.read_text(errors="replace"))]
    finally:
        out["exit_code"] = server.stop()
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, res in report["configs"].items():
        steps = [s for s in res.get("steps", []) if s["latency_p99_s"] is not None]
        if not steps:
            continue
        x = [s["offered_rate"] for s in steps]
        c = COLORS.get(name)
        ax.plot(x, [s["latency_p99_s"] for s in steps], "-o", color=c, label=f"{name} p99 (sustainable {res['sustainable_rate']:.3g} req/s)")
        ax.plot(x, [s["latency_p50_s"] for s in steps], "--", color=c, alpha=0.6, label=f"{name} p50")
    bound = report["settings"]["bound_s"]
    ax.axhline(bound, color="red", lw=1, ls=":", label=f"bound: p99 <= {bound:g} s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s, Poisson)")
    ax.set_ylabel("end-to-end latency (s)")
    g = report["goal"]
    ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}x"
    ax.set_title(f"SmolLM2-135M, 2 threads, max_tokens {report['settings']['max_tokens']}: continuous / baseline "
                 f"sustainable rate {ratio} (goal >= {g['target']:g}x)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    common.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 s steps from 0.5 req/s doubling, at most 2 steps per configuration, to *_quick.json")
    p.add_argument("--step-seconds", type=float, default=60.0, help="seconds of arrivals per rate step (default: 60)")
    p.add_argument("--start-rate", type=float, default=0.1, help="first offered rate, req/s (default: 0.1)")
    p.add_argument("--factor", type=float, default=1.5, help="rate multiplier per step (default: 1.5)")
    p.add_argument("--max-rate", type=float, default=64.0, help="stop stepping above this rate (default: 64)")
    p.add_argument("--max-steps", type=int, default=30, help="most steps per configuration (default: 30)")
    p.add_argument("--bound", type=float, default=20.0, help="p99 end-to-end latency bound, s (default: 20)")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="most failed requests in a step that still meets the bound (default: 0.01)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    p.add_argument("--timeout", type=float, default=None, help="per-request timeout, s (default: 3 x --bound)")
    p.add_argument("--max-in-flight", type=int, default=512, help="load generator's open-request cap (default: 512)")
    p.add_argument("--max-model-len", type=int, default=1024, help="servers' context length; the prompts are short (default: 1024)")
    p.add_argument("--model", default=None, help="model for the servers (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--data-dir", default=None, help="folder with shakespeare/input.txt (default: $MLSYSKIT_DATA_DIR, else ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: 0)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for the servers; spinning OpenMP threads hurt on a shared machine (default: PASSIVE)")
    p.add_argument("--out", default=None, help=f"JSON output (default: {DEFAULT_OUT.relative_to(common.REPO)}; with --quick {QUICK_OUT.relative_to(common.REPO)}); the PNG goes next to it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = common.parse_with_quick(build_parser(), argv, QUICK)
    names = common.split_names(args.configs)
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        print(f"unknown configs {bad}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.start_rate <= 0 or args.factor <= 1 or args.step_seconds <= 0 or args.bound <= 0:
        print("--start-rate, --step-seconds and --bound must be positive and --factor > 1", file=sys.stderr)
        return 2
    args.timeout = args.timeout or 3 * args.bound
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    logdir = Path(tempfile.mkdtemp(prefix="serve_rates_logs_"))  # the servers' output, kept for a look

    prompts, source = load_prompts(args.data_dir, 256, args.seed)
    env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLSYSKIT_API_KEY", None)
    env.pop("OMP_NUM_THREADS", None)  # each server sets its threads from --threads
    load_start = common.loadavgs()
    t_start = time.perf_counter()
    print(f"[serve_rates] configs {names}; prompts: {source}; load average {load_start[0]:.2f}; server logs in {logdir}", flush=True)

    report: dict[str, Any] = {
        "benchmark": "serve_rates",
        "quick": args.quick,
        "host": {**common.platform_info(), "cpu_count": os.cpu_count(), "load_average_start": load_start},
        "versions": common.package_versions(("torch", "fastapi", "uvicorn", "httpx", "numpy")),
        "settings": {
            "bound_s": args.bound, "max_error_rate": args.max_error_rate, "step_seconds": args.step_seconds,
            "start_rate": args.start_rate, "factor": args.factor, "max_rate": args.max_rate, "max_steps": args.max_steps,
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "endpoint": "/v1/chat/completions",
            "arrival": "poisson", "timeout_s": args.timeout, "max_model_len": args.max_model_len, "threads_total": 2,
            "omp_wait_policy": args.omp_wait_policy, "seed": args.seed, "prompts": source, "n_prompts": len(prompts),
        },
        "configs": {},
    }
    for name in names:
        try:
            report["configs"][name] = run_config(name, args, prompts, env, logdir)
        except Exception as e:  # noqa: BLE001 - one broken configuration must not lose the others
            print(f"[serve_rates] {name} failed: {e}", file=sys.stderr, flush=True)
            report["configs"][name] = {"label": CONFIGS[name][0], "error": str(e), "steps": [], "sustainable_rate": None}
    base = report["configs"].get("baseline", {}).get("sustainable_rate")
    cont = report["configs"].get("continuous", {}).get("sustainable_rate")
    ratio = round(cont / base, 3) if base and cont is not None else None
    cfg = report["configs"]
    conclusive = bool(cfg.get("baseline", {}).get("saturated")) and (bool(cfg.get("continuous", {}).get("saturated")) or (ratio or 0) >= GOAL_CONTINUOUS_VS_BASELINE)
    report["goal"] = {
        "what": "sustainable rate (p99 e2e <= bound, errors <= max) of continuous batching / per-request baseline",
        "target": GOAL_CONTINUOUS_VS_BASELINE, "ratio": ratio, "met": ratio is not None and ratio >= GOAL_CONTINUOUS_VS_BASELINE,
        "conclusive": conclusive,  # false when the baseline (or continuous, below the goal) never saturated
        "note": "rates are a geometric grid, so each sustainable rate is a lower bound within one factor step",
    }
    report["host"]["load_average_end"] = common.loadavgs()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    common.write_json(out, report)
    png = out.with_suffix(".png")
    plot(report, png)
    print("\nconfiguration   sustainable req/s   saturated   steps   ready s")
    for name, res in report["configs"].items():
        print(f"{name:<15} {res.get('sustainable_rate')!s:>17}   {'yes' if res.get('saturated') else 'no':>9}   {len(res.get('steps', [])):>5}   {res.get('ready_s', '-')!s:>7}")
    verdict = ("met" if report["goal"]["met"] else "not met") + ("" if conclusive else " (inconclusive: a configuration never saturated; raise --max-steps/--max-rate)")
    print(f"goal: continuous / baseline = {ratio} (target >= {GOAL_CONTINUOUS_VS_BASELINE:g}): {verdict}")
    print(f"results: {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
