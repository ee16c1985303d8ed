"""Workloads: when requests arrive and how long their prompts and outputs are.

``[workload]`` keys:

* ``arrival``: ``poisson`` (exponential gaps at ``rate`` requests/s), ``gamma`` (bursty: gamma
  gaps with the same mean and coefficient of variation ``cv``; cv = 1 is Poisson, larger is
  burstier), ``trace`` (replay ``trace = "file.jsonl"``; ``--rate`` rescales its clock);
* ``requests``, ``rate``, ``seed``;
* ``lengths``: ``known`` (the client's ``max_tokens`` is the true output length, so a policy
  knows it) or ``unknown`` (no ``max_tokens``: the request runs until it ends, or until the
  instance's context is full, which truncates it);
* lengths: ``preset = "sharegpt" | "alpaca"``, or one ``prompt`` / ``output`` distribution, or
  ``[[workload.class]]`` tables (``name``, ``weight``, ``prompt``, ``output``), e.g. the short /
  medium / long mix of ``examples/q11.toml``.

A distribution is ``{ dist = "fixed", value = N }``, ``{ dist = "uniform", min, max }`` or
``{ dist = "lognormal", mean, sigma, min, max }`` (``mean`` is the mean before clipping to
[min, max]; ``sigma`` the standard deviation of the log).

Presets: the means are those the vLLM paper reports for the datasets it synthesizes requests
from (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, section 6.1 and Fig. 11): ShareGPT 161.31 input and 337.99 output
tokens on average, Alpaca 19.31 and 58.45 (ShareGPT's inputs 8.4x and outputs 5.8x longer). The
paper shows histograms, not parameters: the lognormal shape and its sigma (1.0 for ShareGPT,
whose lengths vary more, 0.6 for Alpaca) are our assumption.

Trace files: JSON lines, one request each, as `mlsyskit loadgen` records them (``arrival`` in
seconds, ``prompt`` text, ``tokens`` generated, ``status``); ``prompt_tokens`` /
``output_tokens`` are read when present, else the prompt counts one token per 4 characters (the
router's estimate). Failed records (status other than 200, or an error) are skipped. A JSON
object with a ``records`` list (``run_load(..., keep_records=True)``, what ``loadgen --out``
writes when it keeps records) is read the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsyskit.errors import UserError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sharegpt": {
        "prompt": {"dist": "lognormal", "mean": 161.31, "sigma": 1.0, "min": 4, "max": 2048},
        "output": {"dist": "lognormal", "mean": 337.99, "sigma": 1.0, "min": 4, "max": 2048},
    },
    "alpaca": {
        "prompt": {"dist": "lognormal", "mean": 19.31, "sigma": 0.6, "min": 4, "max": 512},
        "output": {"dist": "lognormal", "mean": 58.45, "sigma": 0.6, "min": 4, "max": 1024},
    },
}

ARRIVALS = ("poisson", "gamma", "trace")


@dataclass
class Workload:
    """Requests in arrival order (plain Python lists: the simulator reads them one by one)."""

    arrival: list[float]
    prompt: list[int]
    output: list[int]
    klass: list[str]
    lengths_known: bool = True
    rate: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrival)


def sample_dist(d: Any, n: int, rng: np.random.Generator, where: str) -> np.ndarray:
    """``n`` integer lengths (at least 1) from a distribution table."""
    if isinstance(d, int) and not isinstance(d, bool):
        d = {"dist": "fixed", "value": d}
    if not isinstance(d, dict):
        raise UserError(f"{where}: a length distribution is a table like {{ dist = \"uniform\", min = 16, max = 256 }}")
    kind = d.get("dist", "fixed")
    lo = int(d.get("min", 1))
    hi = int(d.get("max", 1 << 30))
    if lo < 1 or hi < lo:
        raise UserError(f"{where}: need 1 <= min <= max, got min={lo} max={hi}")
    if kind == "fixed":
        if "value" not in d:
            raise UserError(f"{where}: fixed needs value")
        x = np.full(n, float(d["value"]))
    elif kind == "uniform":
        if "min" not in d or "max" not in d:
            raise UserError(f"{where}: uniform needs min and max")
        return rng.integers(lo, hi + 1, size=n)
    elif kind == "lognormal":
        mean, sigma = d.get("mean"), float(d.get("sigma", 1.0))
        if not isinstance(mean, int | float) or mean <= 0 or sigma < 0:
            raise UserError(f"{where}: lognormal needs mean > 0 and sigma >= 0")
        mu = math.log(mean) - sigma * sigma / 2.0
        x = rng.lognormal(mu, sigma, size=n)
    else:
        raise UserError(f"{where}: unknown dist {kind!r}; use fixed, uniform or lognormal")
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


def arrivals(kind: str, rate: float, n: int, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """``n`` arrival times starting at 0: Poisson or gamma gaps of mean 1/rate."""
    if rate <= 0:
        raise UserError(f"rate must be positive, got {rate}")
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    elif kind == "gamma":
        if cv <= 0:
            raise UserError(f"gamma arrivals need cv > 0, got {cv}")
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    else:
        raise UserError(f"arrival must be one of {', '.join(ARRIVALS)}, got {kind!r}")
    t = np.cumsum(gaps)
    return t - t[0]


def build_workload(table: dict[str, Any], *, rate: float | None = None, requests: int | None = None,
                   seed: int | None = None, base_dir: Path | None = None) -> Workload:
    """The requests of a ``[workload]`` table; ``rate``, ``requests`` and ``seed`` override it."""
    known = {"arrival", "rate", "cv", "requests", "seed", "lengths", "preset", "prompt", "output", "class", "trace"}
    bad = sorted(set(table) - known)
    if bad:
        raise UserError(f"[workload]: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    kind = str(table.get("arrival", "poisson"))
    lengths = str(table.get("lengths", "known"))
    if lengths not in ("known", "unknown"):
        raise UserError(f"[workload] lengths must be known or unknown, got {lengths!r}")
    seed = int(table.get("seed", 0)) if seed is None else seed
    if kind == "trace":
        if "trace" not in table:
            raise UserError("[workload] arrival = \"trace\" needs trace = \"file.jsonl\"")
        p = Path(str(table["trace"]))
        if base_dir is not None and not p.is_absolute():
            p = base_dir / p
        wl = load_trace(p, lengths_known=lengths == "known")
        if requests is not None:
            wl = _take(wl, requests)
        if rate is not None:
            scale = wl.rate / rate if wl.rate > 0 else 1.0
            wl.arrival = [a * scale for a in wl.arrival]
            wl.rate = rate
        return wl
    n = int(requests if requests is not None else table.get("requests", 1000))
    r = float(rate if rate is not None else table.get("rate", 1.0))
    if n < 1:
        raise UserError(f"requests must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    t = arrivals(kind, r, n, rng, float(table.get("cv", 1.0)))
    classes = table.get("class")
    if classes:
        if not isinstance(classes, list):
            raise UserError("[[workload.class]] must be an array of tables")
        w = np.array([float(c.get("weight", 1.0)) for c in classes])
        if (w < 0).any() or w.sum() <= 0:
            raise UserError("[[workload.class]] weights must be non-negative and not all zero")
        names = [str(c.get("name", f"class{i}")) for i, c in enumerate(classes)]
        pick = rng.choice(len(classes), size=n, p=w / w.sum())
        prompt = np.zeros(n, dtype=np.int64)
        output = np.zeros(n, dtype=np.int64)
        for i, c in enumerate(classes):
            idx = np.nonzero(pick == i)[0]
            where = f"[[workload.class]] {names[i]}"
            if "prompt" not in c or "output" not in c:
                raise UserError(f"{where}: needs prompt and output distributions")
            prompt[idx] = sample_dist(c["prompt"], len(idx), rng, where + " prompt")
            output[idx] = sample_dist(c["output"], len(idx), rng, where + " output")
        klass = [names[i] for i in pick]
    else:
        preset = table.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"[workload] unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
            dists = PRESETS[preset]
        else:
            dists = {"prompt": table.get("prompt", {"dist": "fixed", "value": 128}),
                     "output": table.get("output", {"dist": "fixed", "value": 128})}
        prompt = sample_dist(dists["prompt"], n, rng, "[workload] prompt")
        output = sample_dist(dists["output"], n, rng, "[workload] output")
        klass = [str(preset or "all")] * n
    return Workload([float(x) for x in t], [int(x) for x in prompt], [int(x) for x in output], klass,
                    lengths_known=lengths == "known", rate=r,
                    source={"arrival": kind, "rate": r, "requests": n, "seed": seed, "lengths": lengths,
                            "cv": float(table.get("cv", 1.0)) if kind == "gamma" else None})


def _take(wl: Workload, n: int) -> Workload:
    return Workload(wl.arrival[:n], wl.prompt[:n], wl.output[:n], wl.klass[:n], wl.lengths_known, wl.rate, wl.source)


def _first_int(rec: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def load_trace(path: str | Path, lengths_known: bool = True) -> Workload:
    """Requests from a JSONL trace or a JSON report with ``records`` (see the module docs)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"trace file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read trace {p}: {e}") from e
    records: list[Any] = []
    try:  # one JSON document (a report with "records", or a single record) ...
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        records = obj["records"] if isinstance(obj.get("records"), list) else [obj]
    else:  # ... or JSON lines
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: invalid JSON line ({e.msg})") from e
    rows: list[tuple[float, int, int]] = []
    skipped = 0
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise UserError(f"{p}: record {i} is not a JSON object")
        if rec.get("error") is not None or rec.get("status", 200) != 200:
            skipped += 1
            continue
        arr = rec.get("arrival", rec.get("arrival_s"))
        if not isinstance(arr, int | float) or isinstance(arr, bool) or arr < 0:
            raise UserError(f"{p}: record {i} needs a non-negative \"arrival\" in seconds")
        pt = _first_int(rec, ("prompt_tokens",))
        if pt is None:
            if isinstance(rec.get("prompt_ids"), list):
                pt = len(rec["prompt_ids"])
            elif isinstance(rec.get("prompt"), str):
                pt = len(rec["prompt"]) // 4 + 1  # the router's estimate: ~4 characters a token
            else:
                raise UserError(f"{p}: record {i} needs prompt_tokens, prompt_ids or prompt")
        ot = _first_int(rec, ("output_tokens", "new_tokens", "tokens", "completion_tokens"))
        if ot is None or ot < 1 or pt < 1:
            skipped += 1
            continue
        rows.append((float(arr), pt, ot))
    if not rows:
        raise UserError(f"trace {p} holds no usable request ({skipped} skipped)")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    arr = [r[0] - t0 for r in rows]
    span = arr[-1] - arr[0]
    rate = (len(rows) - 1) / span if span > 0 else 0.0
    return Workload(arr, [r[1] for r in rows], [r[2] for r in rows], ["trace"] * len(rows), lengths_known, rate,
                    source={"arrival": "trace", "trace": str(p), "requests": len(rows), "skipped": skipped,
                            "rate": round(rate, 4), "lengths": "known" if lengths_known else "unknown"})
