"""Runs of the simulator for the CLI: one or all policies at one rate (``cluster simulate``),
and the report (``cluster report``): every policy at rising rates, with known and unknown output
lengths, a table, plots, and the scope's questions answered with numbers.

Goals checked by the report (from the issue):

1. Known lengths, at the rate where round-robin misses its SLO (the first rate of the sweep
   where fewer than ``target`` = 90 % of its requests attain it): length-class goodput >= 1.5x
   round-robin's and >= 90 % of the oracle's. Goodput per run is SLO-attaining requests per
   second. Because a policy cannot serve more than is offered, at a rate where round-robin still
   attains, say, 86 %, no policy can reach 1.5x its goodput; the report therefore also gives the
   other common reading, DistServe's (Zhong et al., OSDI 2024): goodput = the highest rate a
   policy sustains with >= 90 % SLO attainment (interpolated between the sweep's rates).
2. Unknown lengths: predict recovers >= half of the goodput gap between least outstanding
   tokens (``lot``) and the oracle, at the rate where ``lot`` misses its SLO and at every rate.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlsyskit.cluster.metrics import per_request, summarize
from mlsyskit.cluster.policies import POLICIES, make_policy
from mlsyskit.cluster.sim import SimResult, simulate
from mlsyskit.cluster.spec import Spec
from mlsyskit.cluster.workload import build_workload
from mlsyskit.errors import UserError
from mlsyskit.runtime import write_json

KNOWN_POLICIES = ("random", "round-robin", "jsq", "lot", "length-class", "best-fit", "oracle")
UNKNOWN_POLICIES = ("round-robin", "lot", "length-class", "best-fit", "predict", "predict-norecover", "oracle")
DEFAULT_RATES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
TARGET = 0.9  # SLO attainment a policy must keep to "meet its SLO"


def policy_names(name: str) -> list[str]:
    """``all`` or one name (``predict-norecover`` is ``predict`` without its recovery)."""
    if name == "all":
        return list(POLICIES) + ["predict-norecover"]
    if name not in POLICIES and name != "predict-norecover":
        raise UserError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}, predict-norecover or all")
    return [name]


def build_policy(name: str, spec: Spec, seed: int) -> Any:
    opts = dict(spec.policy_options)
    if name == "predict-norecover":
        p = make_policy("predict", seed, **{**opts, "recover": False})
        p.name = "predict-norecover"
        return p
    return make_policy(name, seed, **opts)


def run_one(spec: Spec, policy: str, *, rate: float | None, requests: int | None, seed: int | None,
            lengths: str | None = None) -> tuple[dict[str, Any], SimResult]:
    """Simulate one policy; (summary, result)."""
    table = dict(spec.workload)
    if lengths is not None:
        table["lengths"] = lengths
    base_dir = spec.path.parent if spec.path else None
    wl = build_workload(table, rate=rate, requests=requests, seed=seed, base_dir=base_dir)
    pseed = seed if seed is not None else int(table.get("seed", 0))
    res = simulate(spec, wl, build_policy(policy, spec, pseed))
    s = summarize(res, spec.slo)
    s["lengths"] = "known" if wl.lengths_known else "unknown"
    return s, res


# ------------------------------------------------------------------------------------------
# Outputs of `cluster simulate --out DIR`
# ------------------------------------------------------------------------------------------


def write_requests_csv(res: SimResult, path: Path) -> None:
    """One row per request: arrival, lengths, instance, status, TTFT, TPOT, end-to-end."""
    lat = per_request(res)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,class,arrival_s,prompt_tokens,output_tokens,generated,instance,status,ttft_s,tpot_s,e2e_s,preemptions,migrations\n")
        for i in range(len(res.status)):
            def g(x: float) -> str:
                return "" if x != x else f"{x:.6f}"  # NaN: did not finish
            f.write(f"{i},{res.klass[i]},{res.arrival[i]:.6f},{res.prompt[i]},{res.output[i]},{res.generated[i]},"
                    f"{res.instance[i]},{res.status[i]},{g(lat['ttft'][i])},{g(lat['tpot'][i])},{g(lat['e2e'][i])},"
                    f"{res.preemptions[i]},{res.migrations[i]}\n")


def plot_timelines(res: SimResult, spec: Spec, path: Path, title: str = "") -> None:
    """Per-instance KV memory in use and busy fraction over time (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name, tl in res.timelines.items():
        if not tl:
            continue
        t = [p[0] for p in tl]
        axes[0].plot(t, [100 * p[1] for p in tl], label=name, lw=1)
        axes[1].plot(t, [100 * p[2] for p in tl], label=name, lw=1)
    axes[0].set_ylabel("KV memory in use (%)")
    axes[0].set_ylim(0, 105)
    axes[1].set_ylabel("busy (%)")
    axes[1].set_ylim(0, 105)
    axes[1].set_xlabel("simulated time (s)")
    axes[0].legend(loc="upper right", fontsize=8, ncol=len(res.timelines))
    fig.suptitle(title or f"{spec.name}: {res.policy} at {res.rate:g} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_run(out: Path, spec: Spec, runs: list[tuple[dict[str, Any], SimResult]]) -> list[str]:
    """summary.json, per-policy requests CSV and timeline PNG in ``out``; the file names."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    files = ["summary.json"]
    write_json(out / "summary.json", {"spec": str(spec.path) if spec.path else spec.name, "instances": [i.summary() for i in spec.instances],
                                      "model": spec.model.summary(), "runs": [s for s, _ in runs]})
    for s, res in runs:
        stem = s["policy"]
        write_requests_csv(res, out / f"requests_{stem}.csv")
        plot_timelines(res, spec, out / f"timeline_{stem}.png")
        write_json(out / f"timeline_{stem}.json", res.timelines)
        files += [f"requests_{stem}.csv", f"timeline_{stem}.png", f"timeline_{stem}.json"]
    return files


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def sustained_rate(points: list[tuple[float, float]], target: float = TARGET) -> float | None:
    """The highest rate with SLO attainment >= target, interpolated linearly to the first rate
    below it; None if even the lowest rate misses (0 when it misses at the first rate)."""
    points = sorted(points)
    if not points or points[0][1] < target:
        return None
    best = points[0][0]
    for (r0, a0), (r1, a1) in zip(points, points[1:], strict=False):
        if a1 >= target:
            best = r1
            continue
        best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1) if a0 > a1 else r0
        break
    return round(best, 4)


def _row(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("policy", "rate", "completed", "goodput_req_s", "slo_attainment", "throughput_tok_s", "ttft_p50", "ttft_p99",
            "tpot_p50", "e2e_p99", "preemptions", "truncated", "rejected", "migrations", "mispredictions", "sim_wall_s")
    row = {k: s.get(k) for k in keep}
    short = (s.get("by_class") or {}).get("short")
    row["short_ttft_p99"] = short["ttft_p99"] if short else None
    row["long_missed"] = s.get("long_missed")
    return row


def sweep(spec: Spec, policies: Sequence[str], rates: Sequence[float], lengths: str, requests: int, seed: int,
          progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        for p in policies:
            s, res = run_one(spec, p, rate=rate, requests=requests, seed=seed, lengths=lengths)
            row = _row(s)
            row["long_missed"] = res.policy_stats.get("long_missed")
            rows.append(row)
            if progress:
                progress(f"{lengths:7s} rate {rate:<5g} {p:18s} goodput {row['goodput_req_s']:.3f} req/s, "
                         f"SLO {100 * row['slo_attainment']:.1f} %, p99 TTFT {row['ttft_p99']} s")
    return rows


def _at(rows: list[dict[str, Any]], policy: str, rate: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["policy"] == policy and r["rate"] == round(rate, 4)), None)


def _first_miss(rows: list[dict[str, Any]], policy: str, rates: Sequence[float]) -> float | None:
    for rate in rates:
        r = _at(rows, policy, rate)
        if r is not None and r["slo_attainment"] < TARGET:
            return rate
    return None


def goals(known: list[dict[str, Any]], unknown: list[dict[str, Any]], rates: Sequence[float]) -> dict[str, Any]:
    """The issue's two goals, computed from the sweeps (see the module docs)."""
    out: dict[str, Any] = {"slo_attainment_target": TARGET}
    r_miss = _first_miss(known, "round-robin", rates)
    g1: dict[str, Any] = {"rate_round_robin_misses": r_miss}
    if r_miss is not None:
        rr, lc, orc = (_at(known, p, r_miss) for p in ("round-robin", "length-class", "oracle"))
        assert rr and lc and orc
        g1["goodput"] = {"round-robin": rr["goodput_req_s"], "length-class": lc["goodput_req_s"], "oracle": orc["goodput_req_s"]}
        g1["length_class_vs_round_robin"] = round(lc["goodput_req_s"] / max(rr["goodput_req_s"], 1e-9), 3)
        g1["length_class_vs_oracle"] = round(lc["goodput_req_s"] / max(orc["goodput_req_s"], 1e-9), 3)
        g1["met"] = g1["length_class_vs_round_robin"] >= 1.5 and g1["length_class_vs_oracle"] >= 0.9
        g1["max_possible_vs_round_robin"] = round(r_miss / max(rr["goodput_req_s"], 1e-9), 3)
        g1["note"] = ("goodput cannot exceed the offered rate, so at the first rate where round-robin misses (still "
                      f"attaining {100 * rr['slo_attainment']:.0f} %) no policy can reach more than "
                      f"{g1['max_possible_vs_round_robin']}x its goodput; 1.5x needs round-robin at or below 2/3 "
                      "attainment. distserve_reading compares the highest rates each policy sustains instead.")
    # by rate too: where round-robin is far gone the ratio is large
    g1["by_rate"] = []
    for rate in rates:
        rr, lc, orc = (_at(known, p, rate) for p in ("round-robin", "length-class", "oracle"))
        if rr and lc and orc:
            g1["by_rate"].append({
                "rate": rate, "rr_slo": rr["slo_attainment"],
                "lc_vs_rr": round(lc["goodput_req_s"] / max(rr["goodput_req_s"], 1e-9), 3),
                "lc_vs_oracle": round(lc["goodput_req_s"] / max(orc["goodput_req_s"], 1e-9), 3)})
    sustained = {p: sustained_rate([(r["rate"], r["slo_attainment"]) for r in known if r["policy"] == p])
                 for p in dict.fromkeys(r["policy"] for r in known)}
    g1["sustained_rate_at_target"] = sustained
    srr, slc, sor = sustained.get("round-robin"), sustained.get("length-class"), sustained.get("oracle")
    if slc is not None and sor:
        g1["distserve_reading"] = {
            "length_class_vs_round_robin": round(slc / srr, 3) if srr else None,
            "length_class_vs_oracle": round(slc / sor, 3),
            "met": bool(srr is None or slc / srr >= 1.5) and slc / sor >= 0.9,
        }
    out["known_lengths"] = g1

    g2: dict[str, Any] = {}
    r_lot = _first_miss(unknown, "lot", rates)
    g2["rate_lot_misses"] = r_lot
    by_rate = []
    for rate in rates:
        lot, pr, orc = (_at(unknown, p, rate) for p in ("lot", "predict", "oracle"))
        if not (lot and pr and orc):
            continue
        gap = orc["goodput_req_s"] - lot["goodput_req_s"]
        frac = (pr["goodput_req_s"] - lot["goodput_req_s"]) / gap if gap > 1e-9 else None
        by_rate.append({"rate": rate, "lot": lot["goodput_req_s"], "predict": pr["goodput_req_s"], "oracle": orc["goodput_req_s"],
                        "gap_recovered": round(frac, 3) if frac is not None else None})
    g2["by_rate"] = by_rate
    if r_lot is not None:
        at = next((b for b in by_rate if b["rate"] == r_lot), None)
        g2["at_rate_lot_misses"] = at
        g2["met"] = bool(at and at["gap_recovered"] is not None and at["gap_recovered"] >= 0.5)
    sustained_u = {p: sustained_rate([(r["rate"], r["slo_attainment"]) for r in unknown if r["policy"] == p])
                   for p in dict.fromkeys(r["policy"] for r in unknown)}
    g2["sustained_rate_at_target"] = sustained_u
    out["unknown_lengths"] = g2
    return out


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    cols = [("rate", "rate"), ("policy", "policy"), ("goodput_req_s", "goodput/s"), ("slo_attainment", "SLO %"),
            ("ttft_p99", "TTFT p99 s"), ("e2e_p99", "e2e p99 s"), ("short_ttft_p99", "short TTFT p99"),
            ("preemptions", "preempt"), ("migrations", "migr"), ("mispredictions", "mispred"), ("truncated", "trunc")]

    def f(k: str, v: Any) -> str:
        if v is None:
            return "-"
        if k == "slo_attainment":
            return f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:.0f}"
        return str(v)

    lines = [title, " | ".join(h for _, h in cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(f(k, r.get(k)) for k, _ in cols))
    return "\n".join(lines)


def plot_report(known: list[dict[str, Any]], unknown: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    names = list(dict.fromkeys([r["policy"] for r in known] + [r["policy"] for r in unknown]))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(names)}
    for col, (rows, what) in enumerate(((known, "output lengths known"), (unknown, "output lengths unknown"))):
        for p in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["rate"], r["goodput_req_s"], r["ttft_p99"] or float("nan"), r["slo_attainment"]) for r in rows if r["policy"] == p)
            style = "-" if p in ("length-class", "oracle", "predict") else "--"
            axes[0][col].plot([x[0] for x in pts], [x[1] for x in pts], style, marker="o", ms=3, label=p, color=colors[p])
            axes[1][col].plot([x[0] for x in pts], [x[2] for x in pts], style, marker="o", ms=3, label=p, color=colors[p])
        rates = sorted({r["rate"] for r in rows})
        axes[0][col].plot(rates, rates, ":", color="grey", lw=1, label="offered")
        axes[0][col].set_title(f"goodput (SLO-attaining req/s), {what}")
        axes[0][col].set_xlabel("arrival rate (req/s)")
        axes[1][col].set_title(f"p99 time to first token, {what}")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("arrival rate (req/s)")
        axes[1][col].set_ylabel("seconds")
        axes[0][col].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chunk_admission_note(spec: Spec, rate: float, requests: int, seed: int) -> dict[str, Any]:
    """The same runs with mlsyskit's engine admission rule ("chunk") instead of vLLM's ("whole")."""
    chunked = copy.copy(spec)
    chunked.instances = [copy.copy(i) for i in spec.instances]
    for inst in chunked.instances:
        inst.engine = copy.copy(inst.engine)
        inst.engine.admission = "chunk"
    out = {}
    for p in ("round-robin", "length-class"):
        s_whole, _ = run_one(spec, p, rate=rate, requests=requests, seed=seed, lengths="known")
        s_chunk, _ = run_one(chunked, p, rate=rate, requests=requests, seed=seed, lengths="known")
        out[p] = {"whole": {k: s_whole[k] for k in ("goodput_req_s", "slo_attainment", "preemptions", "ttft_p99")},
                  "chunk": {k: s_chunk[k] for k in ("goodput_req_s", "slo_attainment", "preemptions", "ttft_p99")}}
    return {"rate": rate, "runs": out}


def make_report(spec: Spec, *, rates: Sequence[float] = DEFAULT_RATES, requests: int = 3000, seed: int = 0,
                big_requests: int = 100_000, out: Path, progress: bool = False) -> dict[str, Any]:
    """Run the report and write ``out`` (JSON), the plot and timelines next to it."""
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[cluster report {time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    rates = sorted(rates)
    known = sweep(spec, KNOWN_POLICIES, rates, "known", requests, seed, say)
    unknown = sweep(spec, UNKNOWN_POLICIES, rates, "unknown", requests, seed, say)
    g = goals(known, unknown, rates)
    r_star = g["known_lengths"].get("rate_round_robin_misses") or rates[len(rates) // 2]
    say(f"timelines at {r_star} req/s")
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    timelines = {}
    for p in ("round-robin", "length-class"):
        s, res = run_one(spec, p, rate=r_star, requests=requests, seed=seed, lengths="known")
        png = Path(f"{stem}_timeline_{p}.png")
        plot_timelines(res, spec, png, f"{spec.name}: {p}, lengths known, {r_star:g} req/s")
        timelines[p] = png.name
    say("admission rule: chunk vs whole")
    note = chunk_admission_note(spec, r_star, requests, seed)
    say(f"speed: {big_requests} requests")
    speed = {}
    for p in ("lot", "predict"):
        t = time.process_time()
        s, _ = run_one(spec, p, rate=r_star, requests=big_requests, seed=seed, lengths="unknown" if p == "predict" else "known")
        speed[p] = {"requests": big_requests, "sim_wall_s": s["sim_wall_s"], "cpu_s": round(time.process_time() - t, 3),
                    "loadavg_1m": round(os.getloadavg()[0], 2)}
    report = {
        "report": "cluster",
        "spec": str(spec.path) if spec.path else spec.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": spec.model.summary(),
        "instances": [i.summary() for i in spec.instances],
        "slo": {"ttft_s": spec.slo.ttft_s, "tpot_s": spec.slo.tpot_s, "attainment_target": TARGET},
        "workload": {k: v for k, v in spec.workload.items() if k not in ("rate", "requests", "lengths")},
        "settings": {"rates": list(rates), "requests_per_run": requests, "seed": seed},
        "known_lengths": known,
        "unknown_lengths": unknown,
        "goals": g,
        "chunk_admission": note,
        "timelines": timelines,
        "speed_100k": speed,
        "host": {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": len(os.sched_getaffinity(0))},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(out, report)
    png = out.with_suffix(".png")
    plot_report(known, unknown, png, f"{spec.name}: goodput and p99 TTFT (SLO: TTFT <= {spec.slo.ttft_s} s, TPOT <= {spec.slo.tpot_s} s)")
    report["png"] = str(png)
    return report
