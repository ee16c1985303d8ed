"""Per-request latencies, SLO attainment, goodput and the one-line JSON summary of a run.

Definitions (times at the client: the network latency back to the entry node included):

* TTFT: first token - arrival; TPOT: (finish - first token) / (generated - 1), 0 for one token;
  end-to-end: finish - arrival.
* A request **attains the SLO** when it completed its whole output (not truncated by a context,
  not rejected) with TTFT <= ``slo.ttft_s`` and TPOT <= ``slo.tpot_s``.
* ``slo_attainment``: attaining requests / all requests; ``goodput_req_s``: attaining requests /
  the run's span (first arrival to last finish); ``throughput_tok_s``: output tokens of finished
  requests (truncated ones included) / the same span.
* Latency percentiles are over completed requests (``completed``: whole output produced).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlsyskit.cluster.sim import SimResult
from mlsyskit.cluster.spec import SLO

SUMMARY_KEYS = ("policy", "rate", "requests", "completed", "throughput_tok_s", "goodput_req_s", "slo_attainment",
                "ttft_p50", "ttft_p99", "tpot_p50", "e2e_p99", "preemptions", "sim_wall_s")


def per_request(r: SimResult) -> dict[str, np.ndarray]:
    """Arrays of TTFT, TPOT and end-to-end latency (NaN where a request did not finish)."""
    arr = np.asarray(r.arrival)
    first = np.asarray(r.t_first)
    fin = np.asarray(r.t_finish)
    gen = np.asarray(r.generated)
    ok = np.asarray([s != "rejected" for s in r.status])
    ttft = np.where(ok & (first >= 0), first - arr, np.nan)
    e2e = np.where(ok, fin - arr, np.nan)
    tpot = np.where(ok & (gen > 1), (fin - first) / np.maximum(gen - 1, 1), np.where(ok, 0.0, np.nan))
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e}


def _pct(x: np.ndarray, q: float) -> float | None:
    x = x[~np.isnan(x)]
    return round(float(np.percentile(x, q)), 4) if x.size else None


def summarize(r: SimResult, slo: SLO) -> dict[str, Any]:
    """The JSON summary: the keys ``mlsyskit cluster simulate`` prints, then details."""
    lat = per_request(r)
    status = np.asarray(r.status)
    done = status == "done"
    finished = done | (status == "truncated")
    attained = done & (lat["ttft"] <= slo.ttft_s) & (lat["tpot"] <= slo.tpot_s)
    n = len(status)
    fin = np.asarray(r.t_finish)
    start = min(r.arrival) if r.arrival else 0.0
    end = float(fin[finished].max()) if finished.any() else start
    span = max(end - start, 1e-9)
    tokens = int(np.asarray(r.generated)[finished].sum())
    d = {k: lat[k][done] for k in lat}
    out: dict[str, Any] = {
        "policy": r.policy,
        "rate": round(float(r.rate), 4),
        "requests": n,
        "completed": int(done.sum()),
        "throughput_tok_s": round(tokens / span, 3),
        "goodput_req_s": round(float(attained.sum()) / span, 4),
        "slo_attainment": round(float(attained.sum()) / n, 4) if n else 0.0,
        "ttft_p50": _pct(d["ttft"], 50),
        "ttft_p99": _pct(d["ttft"], 99),
        "tpot_p50": _pct(d["tpot"], 50),
        "e2e_p99": _pct(d["e2e"], 99),
        "preemptions": int(sum(r.preemptions)),
        "sim_wall_s": round(r.sim_wall_s, 3),
        # details
        "truncated": int((status == "truncated").sum()),
        "rejected": int((status == "rejected").sum()),
        "migrations": int(sum(r.migrations)),
        "mispredictions": r.policy_stats.get("mispredictions", 0),
        "span_s": round(span, 3),
        "e2e_p50": _pct(d["e2e"], 50),
        "tpot_p99": _pct(d["tpot"], 99),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
    }
    classes = sorted(set(r.klass))
    if len(classes) > 1:
        kl = np.asarray(r.klass)
        out["by_class"] = {
            c: {
                "requests": int((kl == c).sum()),
                "slo_attainment": round(float(attained[kl == c].mean()), 4),
                "ttft_p99": _pct(lat["ttft"][done & (kl == c)], 99),
                "e2e_p99": _pct(lat["e2e"][done & (kl == c)], 99),
                "truncated": int(((status == "truncated") & (kl == c)).sum()),
            }
            for c in classes
        }
    inst = np.asarray(r.instance)
    out["per_instance"] = [
        {**s, "requests": int((inst == i).sum()), "busy_fraction": round(s["busy_s"] / span, 4)}
        for i, s in enumerate(r.instances)
    ]
    return out


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the issue's interface lists, in its order."""
    return {k: summary[k] for k in SUMMARY_KEYS}
