"""The roofline cost model of one engine step on one instance.

A step computes ``T`` tokens (decode tokens, prefill chunks), samples ``S`` of them, and has
``P`` attention (query, key) pairs; it reads the weights once and ``R`` cached tokens of KV and
writes ``T`` new ones. On an instance of ``tp`` GPUs (tensor parallel, weights and KV heads
split evenly):

    compute  = (T * linear_flops + S * head_flops + P * attn_flops) / (tp * peak_flops * mfu)
    memory   = (weight_bytes + (R + T) * kv_bytes_per_token) / (tp * bandwidth * mbu)
    allreduce= 2 * n_layers * ring(T * hidden * act_bytes)         (0 when tp = 1)
    ring(b)  = 2 (tp - 1) / tp * b / link_bandwidth + 2 (tp - 1) * link_latency
    step     = max(compute, memory) + allreduce + step_overhead + seq_overhead * seqs
               + token_overhead * T + kv_overhead * R

``mfu``/``mbu`` (the fraction of peak FLOP/s and bandwidth a real kernel reaches) and the
overheads are what ``mlsyskit cluster calibrate`` fits to measured step times (``kv_overhead``:
per cached token attended to, for attention that runs slower than the roofline says, as on a
CPU; 0 by default).

For a run of decode-only steps with ``D`` sequences whose context grows by ``D`` tokens a
step, compute and memory are both linear in the step index, so the time of ``k`` steps has a
closed form (:meth:`InstanceCost.decode_run_time`): the simulator jumps over such runs in O(1).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

from mlsyskit.cluster.model import ModelSpec


@dataclass(frozen=True)
class CostParams:
    """Efficiencies and overheads (fitted by ``cluster calibrate``; GPU defaults assumed)."""

    mfu: float = 0.5
    mbu: float = 0.8
    step_overhead_s: float = 0.002
    seq_overhead_s: float = 0.0
    token_overhead_s: float = 0.0
    kv_overhead_s: float = 0.0  # per cached token read by attention


@dataclass(frozen=True)
class Link:
    """A link: bandwidth in bytes/s and one-way latency in seconds."""

    bandwidth: float
    latency: float

    def transfer_s(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


class InstanceCost:
    """Step times of one instance (one model on ``tp`` GPUs)."""

    def __init__(self, model: ModelSpec, flops: float, bandwidth: float, tp: int, params: CostParams,
                 tp_link: Link | None = None) -> None:
        self.model = model
        self.tp = tp
        self.params = params
        self.flops = flops * tp * params.mfu  # effective FLOP/s of the instance
        self.bw = bandwidth * tp * params.mbu  # effective bytes/s
        self.lin = model.linear_flops_per_token
        self.head = model.head_flops_per_token
        self.attn = model.attn_flops_per_pair
        self.kvb = model.kv_bytes_per_token
        self.w = model.weight_bytes
        if tp > 1:
            if tp_link is None:
                raise ValueError("tensor parallelism needs a link between the GPUs")
            # per step: 2 all-reduces per layer of T * hidden activations, ring algorithm
            n = 2 * model.n_layers
            self.ar_fixed = n * 2 * (tp - 1) * tp_link.latency
            self.ar_per_token = n * 2 * (tp - 1) / tp * model.activation_bytes_per_token / tp_link.bandwidth
        else:
            self.ar_fixed = self.ar_per_token = 0.0

    def scaled(self, k: float) -> InstanceCost:
        """This instance with every step ``k`` times slower (rates divided by ``k``, all-reduce and
        overheads multiplied): a slower or busier machine of the same shape."""
        out = copy.copy(self)
        out.flops, out.bw = self.flops / k, self.bw / k
        out.ar_fixed, out.ar_per_token = self.ar_fixed * k, self.ar_per_token * k
        p = self.params
        out.params = replace(p, step_overhead_s=p.step_overhead_s * k, seq_overhead_s=p.seq_overhead_s * k,
                             token_overhead_s=p.token_overhead_s * k, kv_overhead_s=p.kv_overhead_s * k)
        return out

    # -- one step ----------------------------------------------------------------------------
    def step_time(self, tokens: int, sampled: int, pairs: float, kv_read: float, seqs: int) -> float:
        """Seconds of one step (see the module docs for the terms)."""
        p = self.params
        compute = (tokens * self.lin + sampled * self.head + pairs * self.attn) / self.flops
        memory = (self.w + (kv_read + tokens) * self.kvb) / self.bw
        ar = self.ar_fixed + self.ar_per_token * tokens if tokens else 0.0
        return (max(compute, memory) + ar + p.step_overhead_s + p.seq_overhead_s * seqs + p.token_overhead_s * tokens
                + p.kv_overhead_s * kv_read)

    def breakdown(self, tokens: int, sampled: int, pairs: float, kv_read: float, seqs: int) -> dict[str, float]:
        """The terms of :meth:`step_time` apart (for reports and tests)."""
        p = self.params
        return {
            "compute_s": (tokens * self.lin + sampled * self.head + pairs * self.attn) / self.flops,
            "memory_s": (self.w + (kv_read + tokens) * self.kvb) / self.bw,
            "allreduce_s": self.ar_fixed + self.ar_per_token * tokens if tokens else 0.0,
            "overhead_s": p.step_overhead_s + p.seq_overhead_s * seqs + p.token_overhead_s * tokens + p.kv_overhead_s * kv_read,
        }

    @staticmethod
    def prefill_pairs(computed: int, n: int) -> float:
        """Attention pairs of a chunk of ``n`` tokens after ``computed`` cached ones (causal)."""
        return n * computed + n * (n + 1) / 2.0

    # -- runs of decode steps ----------------------------------------------------------------
    def _decode_lines(self, d: int, ctx0: float) -> tuple[float, float, float, float, float, float]:
        """Step i of a decode run (d sequences, ``ctx0`` cached tokens in all at step 0) costs
        max(a1 + b1 i, a2 + b2 i) + c + e i."""
        a1 = (d * (self.lin + self.head) + (ctx0 + d) * self.attn) / self.flops
        b1 = d * self.attn / self.flops
        a2 = (self.w + (ctx0 + d) * self.kvb) / self.bw
        b2 = d * self.kvb / self.bw
        p = self.params
        c = (self.ar_fixed + self.ar_per_token * d + p.step_overhead_s + p.seq_overhead_s * d + p.token_overhead_s * d
             + p.kv_overhead_s * ctx0)
        e = p.kv_overhead_s * d
        return a1, b1, a2, b2, c, e

    def decode_run_time(self, d: int, ctx0: float, k: int) -> float:
        """Seconds of ``k`` decode steps of ``d`` sequences holding ``ctx0`` cached tokens in all
        at the start (exactly the sum of :meth:`step_time` over the steps)."""
        if k <= 0:
            return 0.0
        a1, b1, a2, b2, c, e = self._decode_lines(d, ctx0)
        return _sum_max_lines(a1, b1, a2, b2, k) + _line_sum(c, e, 0, k)

    def decode_steps_done(self, d: int, ctx0: float, k: int, elapsed: float) -> int:
        """The step of a ``k``-step decode run in progress after ``elapsed`` seconds, counted
        from 1: the smallest j <= k whose end is at or after ``elapsed``."""
        if k <= 1:
            return 1
        a1, b1, a2, b2, c, e = self._decode_lines(d, ctx0)

        def run(j: int) -> float:
            return _sum_max_lines(a1, b1, a2, b2, j) + _line_sum(c, e, 0, j)

        # Step times grow with i, so the run's time is convex in j: solve the quadratic of the
        # larger line for a first guess, then walk to the exact step with the closed form.
        a, b = (a1, b1) if a1 + b1 * (k - 1) >= a2 + b2 * (k - 1) else (a2, b2)
        a, b = a + c, b + e
        if b > 0:
            disc = (a - b / 2) ** 2 + 2 * b * elapsed
            j = math.ceil((-(a - b / 2) + math.sqrt(disc)) / b)
        else:
            j = math.ceil(elapsed / a) if a > 0 else 1
        j = min(max(j, 1), k)
        while j > 1 and run(j - 1) >= elapsed:
            j -= 1
        while j < k and run(j) < elapsed:
            j += 1
        return j


def _line_sum(a: float, b: float, lo: int, hi: int) -> float:
    n = hi - lo
    return n * a + b * n * (lo + hi - 1) / 2.0 if n > 0 else 0.0


def _sum_max_lines(a1: float, b1: float, a2: float, b2: float, k: int) -> float:
    """sum_{i=0}^{k-1} max(a1 + b1 i, a2 + b2 i), exactly: the lines cross at most once."""
    d, e = a1 - a2, b1 - b2  # line 1 above line 2 where d + e i >= 0
    if e == 0:
        return _line_sum(a1, b1, 0, k) if d >= 0 else _line_sum(a2, b2, 0, k)
    x = -d / e
    if e > 0:  # line 1 wins from ceil(x) on
        m = min(max(math.ceil(x), 0), k)
        return _line_sum(a2, b2, 0, m) + _line_sum(a1, b1, m, k)
    m = min(max(math.floor(x) + 1, 0), k)  # line 1 wins up to floor(x)
    return _line_sum(a1, b1, 0, m) + _line_sum(a2, b2, m, k)
