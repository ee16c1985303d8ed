"""Discrete-event simulation of engine instances behind a router.

Each instance runs the engine's own scheduling (:mod:`mlsyskit.engine.scheduler`), step by
step: every step the running sequences decode one token each, prompts still being prefilled
get their next chunk, and waiting requests are admitted while the token budget
(``max_num_batched_tokens``), ``max_num_seqs`` and the KV pool allow. KV memory is counted in
blocks of ``block_size`` tokens, allocated before each step; when a step does not fit, the most
recently admitted sequences are preempted (their blocks freed, recomputed later with the tokens
they already generated kept), as the engine does. Step times come from the roofline cost model
(:mod:`mlsyskit.cluster.cost`). Requests enter at the spec's entry node and cross the network to
their instance (latency + bytes / bandwidth); answers cross it back (latency).

Speed: the state of an instance is kept in aggregates, not per sequence: the decoding sequences
are a count, the sum of their context lengths and a histogram of their context length modulo
the block size (which says how many need a new block at a given step); their finish steps wait
in a heap. A run of decode-only steps with nothing new to admit is then one event whose length
has a closed form (:meth:`InstanceCost.decode_run_time`), ended early when a request arrives.
100,000 requests take seconds.

Determinism: everything is a function of the spec, the workload (its seed) and the policy's
seed; ties in the event queue break by insertion order.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mlsyskit.cluster.cost import InstanceCost
from mlsyskit.cluster.policies import InstanceView, Ledger, Policy, RequestInfo, classify
from mlsyskit.cluster.spec import InstanceSpec, Spec
from mlsyskit.cluster.workload import Workload

WAITING, PREFILL, DECODE, DONE, MOVING = range(5)
EV_FINISH, EV_WATCH = 0, 1
FF, ONE = 0, 1
_ARRIVE, _DELIVER, _STEP = 0, 1, 2
TOKEN_ID_BYTES = 4  # a request crosses the network as token ids (int32)


class Seq:
    """One request and its state on the instance that holds it."""

    __slots__ = ("i", "info", "prompt", "output", "limit", "gen", "computed", "blocks", "key", "state", "admit",
                 "ver", "inst", "t_first", "t_finish", "preemptions", "migrations", "watch_at", "status", "lat")

    def __init__(self, i: int, info: RequestInfo, prompt: int, output: int) -> None:
        self.i = i
        self.info = info
        self.prompt = prompt
        self.output = output
        self.limit = output  # tokens it will generate where it is (fewer: truncated by the context)
        self.gen = 0
        self.computed = 0
        self.blocks = 0
        self.key = 0  # while decoding: computed - instance step
        self.state = WAITING
        self.admit = 0
        self.ver = 0
        self.inst = -1
        self.t_first = -1.0
        self.t_finish = -1.0
        self.preemptions = 0
        self.migrations = 0
        self.watch_at = 0
        self.status = ""
        self.lat = 0.0  # network latency back to the entry node


class Instance:
    """One engine instance's scheduler state (see the module docs)."""

    def __init__(self, idx: int, spec: InstanceSpec) -> None:
        self.idx = idx
        self.spec = spec
        self.name = spec.name
        self.cost: InstanceCost = spec.cost
        self.bs = spec.engine.block_size
        self.nblocks = spec.num_blocks
        self.max_seqs = spec.engine.max_num_seqs
        self.budget = spec.engine.max_num_batched_tokens
        self.mml = spec.max_model_len
        self.whole = spec.engine.admission == "whole"
        self.watermark = max(1, self.nblocks // 100) if self.whole else 0
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}  # admission counter -> seq, in admission order
        self.prefill: list[Seq] = []  # running, not (yet) decoding
        self.D = 0  # decoding sequences
        self.keysum = 0  # sum of their (computed - step)
        self.hist = [0] * self.bs  # their (computed - step) mod block size
        self.events: list[tuple[int, int, int, Seq, int]] = []  # (step, tie, ver, seq, kind)
        self.step = 0
        self.used = 0
        self.admitted = 0
        self.plan: list[Any] | None = None
        self.ver = 0
        self.tie = 0
        self.busy = 0.0
        self.preemptions = 0
        self.max_used = 0
        self.steps = 0
        self.timeline: list[tuple[float, float, float, int]] = []  # (t, kv fraction, busy fraction, running)
        self._tl_last = (0.0, 0.0)
        self.fast_forward = True  # False: every step is its own event (the reference for tests)

    # -- decoders as aggregates ---------------------------------------------------------------
    def _new_blocks(self, k: int) -> int:
        """Blocks the decoders need for the next ``k`` steps: every ``block_size`` steps each
        decoder crosses one block boundary; in the last ``k mod block_size`` steps, those whose
        context is that close below a boundary cross one more."""
        D = self.D
        if k <= 0 or not D:
            return 0
        bs = self.bs
        q, rem = divmod(k, bs)
        total = D * q
        if rem:
            hist, s = self.hist, self.step
            for j in range(rem):  # residues r with (r + s + j) % bs == 0
                total += hist[(-s - j) % bs]
        return total

    def _add_decoder(self, q: Seq) -> None:
        q.state = DECODE
        q.key = key = q.computed - self.step
        self.D += 1
        self.keysum += key
        self.hist[key % self.bs] += 1
        q.ver += 1
        self.tie += 1
        heapq.heappush(self.events, (self.step + q.limit - q.gen, self.tie, q.ver, q, EV_FINISH))
        if q.gen < q.watch_at < q.limit:
            self.tie += 1
            heapq.heappush(self.events, (self.step + q.watch_at - q.gen, self.tie, q.ver, q, EV_WATCH))

    def _drop_decoder(self, q: Seq) -> None:
        """Take a decoder out of the aggregates; its computed, gen and blocks made explicit."""
        key = q.key
        self.D -= 1
        self.keysum -= key
        self.hist[key % self.bs] -= 1
        q.computed = key + self.step
        q.gen = q.computed - q.prompt + 1
        q.blocks = -(-q.computed // self.bs)
        q.ver += 1

    def _clean_events(self) -> None:
        ev = self.events
        while ev and (ev[0][3].ver != ev[0][2] or ev[0][3].state != DECODE):
            heapq.heappop(ev)

    # -- planning ------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.D or self.prefill or self.waiting)

    def _admission_blocked(self) -> bool:
        if len(self.running) >= self.max_seqs:
            return True
        left = self.budget - self.D
        if left <= 0:
            return True
        h = self.waiting[0]
        n = h.prompt + h.gen - h.computed
        if not self.whole:
            n = min(n, left)
        need = -(-(h.computed + n) // self.bs) - h.blocks + (self.watermark if self.running else 0)
        return need > self.nblocks - self.used - self._new_blocks(1)

    def plan_next(self, t: float) -> float | None:
        """Plan the next step (or run of decode steps) from time ``t``; its end time."""
        if not (self.D or self.prefill or self.waiting):
            self.plan = None
            return None
        if self.fast_forward and self.D and not self.prefill and (not self.waiting or self._admission_blocked()):
            self._clean_events()
            k = self.events[0][0] - self.step
            free = self.nblocks - self.used
            if k >= 2 and self.D * -(-k // self.bs) > free and self._new_blocks(k) > free:  # stop before the pool runs out
                lo, hi = 0, k
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if self._new_blocks(mid) <= free:
                        lo = mid
                    else:
                        hi = mid - 1
                k = lo
            if k >= 2:
                ctx0 = self.keysum + self.D * self.step
                dur = self.cost.decode_run_time(self.D, ctx0, k)
                self.plan = [FF, t, k, self.D, ctx0, dur]
                return t + dur
        return self._plan_one(t)

    def _plan_one(self, t: float) -> float:
        bs, s = self.bs, self.step
        D = self.D
        budget = self.budget - D
        need = self.hist[-s % bs] if D else 0
        chunks: list[list[Any]] = []
        for q in self.prefill:
            if budget <= 0:
                break
            n = min(q.prompt + q.gen - q.computed, budget)
            nb = -(-(q.computed + n) // bs) - q.blocks
            chunks.append([q, n, nb])
            need += nb
            budget -= n
        free = self.nblocks - self.used
        while need > free:  # preempt the newest until the step fits (the engine's rule)
            _, v = self.running.popitem()
            if v.state == DECODE:
                if (v.key + s) % bs == 0:
                    need -= 1
                self._drop_decoder(v)
                D -= 1
            else:
                for j, c in enumerate(chunks):
                    if c[0] is v:
                        need -= c[2]
                        budget += c[1]
                        del chunks[j]
                        break
                self.prefill.remove(v)
            self.used -= v.blocks
            free += v.blocks
            v.blocks = v.computed = 0
            v.state = WAITING
            v.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(v)
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            h = self.waiting[0]
            rest = h.prompt + h.gen - h.computed
            n = min(rest, budget)
            nb = -(-(h.computed + n) // bs) - h.blocks
            if self.whole:  # the whole remaining prompt must fit, with the watermark to spare
                wm = self.watermark if self.running else 0  # an empty pool takes what fits
                if -(-(h.computed + rest) // bs) - h.blocks + wm > free - need:
                    break
            elif nb > free - need:
                break
            self.waiting.popleft()
            self.admitted += 1
            h.admit = self.admitted
            h.state = PREFILL
            self.running[h.admit] = h
            self.prefill.append(h)
            chunks.append([h, n, nb])
            need += nb
            budget -= n
        self.used += need
        if self.used > self.max_used:
            self.max_used = self.used
            if self.used > self.nblocks:
                raise AssertionError(f"{self.name}: {self.used} KV blocks in use, pool has {self.nblocks}")
        ctx = self.keysum + D * s
        tokens = D
        sampled = D
        pairs = float(ctx + D)
        kv_read = float(ctx)
        for q, n, _ in chunks:
            tokens += n
            c = q.computed
            if c + n == q.prompt + q.gen:
                sampled += 1
            pairs += n * c + n * (n + 1) / 2.0
            kv_read += c
        if tokens == 0:
            raise AssertionError(f"{self.name}: nothing could be scheduled with work pending")
        dt = self.cost.step_time(tokens, sampled, pairs, kv_read, D + len(chunks))
        self.plan = [ONE, t, 1, chunks, dt]
        return t + dt

    def truncate(self, t: float) -> float | None:
        """A request arrived at ``t`` during a run of decode steps: end the run at the step in
        progress (the request joins at the next step). The new end time, or None if unchanged."""
        p = self.plan
        if p is None or p[0] != FF:
            return None
        _, t0, k, d, ctx0, _ = p
        j = self.cost.decode_steps_done(d, ctx0, k, t - t0)
        if j >= k:
            return None
        p[2] = j
        p[5] = self.cost.decode_run_time(d, ctx0, j)
        self.ver += 1
        return t0 + p[5]

    def complete(self, t: float) -> tuple[list[Seq], list[Seq]]:
        """Apply the planned step(s) ending at ``t``: (finished seqs, seqs at a watch point)."""
        p = self.plan
        assert p is not None
        self.plan = None
        finished: list[Seq] = []
        if p[0] == FF:
            k = p[2]
            self.used += self._new_blocks(k)
            if self.used > self.max_used:
                self.max_used = self.used
                if self.used > self.nblocks:
                    raise AssertionError(f"{self.name}: {self.used} KV blocks in use, pool has {self.nblocks}")
            self.step += k
            self.steps += k
            self.busy += p[5]
        else:
            self.step += 1
            self.steps += 1
            self.busy += p[4]
            for q, n, nb in p[3]:
                q.computed += n
                q.blocks += nb
                if q.computed == q.prompt + q.gen:
                    q.gen += 1
                    if q.t_first < 0:
                        q.t_first = t
                    self.prefill.remove(q)
                    if q.gen >= q.limit:
                        self._finish(q, t)
                        finished.append(q)
                    else:
                        self._add_decoder(q)
        watched: list[Seq] = []
        ev = self.events
        while ev and ev[0][0] <= self.step:
            _, _, ver, q, kind = heapq.heappop(ev)
            if q.ver != ver or q.state != DECODE:
                continue
            if kind == EV_FINISH:
                self._drop_decoder(q)
                self._finish(q, t)
                finished.append(q)
            else:
                watched.append(q)
        return finished, watched

    def _finish(self, q: Seq, t: float) -> None:
        del self.running[q.admit]
        self.used -= q.blocks
        q.blocks = 0
        q.state = DONE
        q.t_finish = t

    def remove(self, q: Seq) -> None:
        """Take a running decoder off this instance (it moves elsewhere); its blocks freed."""
        self._drop_decoder(q)
        del self.running[q.admit]
        self.used -= q.blocks
        q.blocks = 0
        q.state = MOVING

    def halve_timeline(self) -> None:
        """Merge samples pairwise (the later time and memory, the mean busy fraction)."""
        tl = self.timeline
        merged = [(b[0], b[1], round((a[2] + b[2]) / 2, 4), b[3]) for a, b in zip(tl[0::2], tl[1::2], strict=False)]
        if len(tl) % 2:
            merged.append(tl[-1])
        self.timeline = merged

    def sample_timeline(self, t: float) -> None:
        """Record (t, KV fraction in use, busy fraction since the last sample, running)."""
        busy = self.busy + (max(0.0, t - self.plan[1]) if self.plan is not None else 0.0)  # the step running now
        t_last, busy_last = self._tl_last
        span = t - t_last
        frac = min(1.0, max(0.0, (busy - busy_last) / span)) if span > 0 else 0.0
        self.timeline.append((round(t, 4), round(self.used / self.nblocks, 4), round(frac, 4), len(self.running)))
        self._tl_last = (t, busy)


def instance_views(spec: Spec) -> list[InstanceView]:
    """What a router knows of each instance of the spec (capacity and speed from the cost model)."""
    views = []
    for inst in spec.instances:
        d = max(1, min(inst.engine.max_num_seqs, inst.kv_tokens // 1024))
        full = inst.cost.decode_run_time(d, d * 512.0, 1)
        views.append(InstanceView(
            name=inst.name, kv_tokens=inst.kv_tokens, max_model_len=inst.max_model_len,
            decode_tok_s=1.0 / inst.cost.decode_run_time(1, 512.0, 1), throughput_tok_s=d / full,
        ))
    classify(views)
    return views


@dataclass
class SimResult:
    """Per-request outcomes and per-instance statistics of one run."""

    policy: str
    rate: float
    arrival: list[float]
    prompt: list[int]
    output: list[int]
    klass: list[str]
    status: list[str]  # done, truncated, rejected
    t_first: list[float]  # at the client (-1: none)
    t_finish: list[float]
    generated: list[int]
    instance: list[int]
    preemptions: list[int]
    migrations: list[int]
    instances: list[dict[str, Any]]
    timelines: dict[str, list[tuple[float, float, float, int]]]
    sim_wall_s: float
    policy_stats: dict[str, int] = field(default_factory=dict)


def prefill_time(cost: InstanceCost, tokens: int, budget: int) -> float:
    """Seconds to prefill ``tokens`` tokens alone, in chunks of ``budget``."""
    t, done = 0.0, 0
    while done < tokens:
        n = min(budget, tokens - done)
        t += cost.step_time(n, 1 if done + n == tokens else 0, cost.prefill_pairs(done, n), done, 1)
        done += n
    return t


def simulate(spec: Spec, workload: Workload, policy: Policy, *, timeline_points: int = 400,
             fast_forward: bool = True) -> SimResult:
    """Run the workload through the spec's instances under ``policy``. ``fast_forward=False``
    makes every engine step its own event (slow; the same result, for tests)."""
    wall0 = time.perf_counter()
    insts = [Instance(i, s) for i, s in enumerate(spec.instances)]
    for inst in insts:
        inst.fast_forward = fast_forward
    views = instance_views(spec)
    ledger = Ledger(views)
    n = len(workload)
    known = workload.lengths_known
    seqs: list[Seq | None] = [None] * n
    status = ["rejected"] * n
    heap: list[tuple[float, int, int, Any, Any]] = []
    tie = 0
    for i, a in enumerate(workload.arrival):
        heap.append((a, i, _ARRIVE, i, None))
    tie = n
    heapq.heapify(heap)
    entry = spec.entry
    inst_lat = [0.0 if s.node == entry else spec.network.latency for s in spec.instances]
    points = max(timeline_points, 2)
    tl_dt = max(workload.arrival[-1], 1.0) * 1.1 / points
    tl_next = 0.0
    push, pop = heapq.heappush, heapq.heappop

    def schedule(inst: Instance, t: float) -> None:
        nonlocal tie
        end = inst.plan_next(t)
        if end is not None:
            tie += 1
            push(heap, (end, tie, _STEP, inst, inst.ver))

    def deliver(q: Seq, inst: Instance, t: float) -> None:
        nonlocal tie
        if q.prompt + (q.info.max_tokens or 1) > inst.mml or q.prompt + q.gen >= inst.mml:
            q.status = "rejected"  # the server's 400: it does not fit this context
            q.state = DONE
            q.t_finish = t
            ledger.finish(q.i)
            return
        q.limit = min(q.output, inst.mml - q.prompt)
        q.inst = inst.idx
        q.lat = inst_lat[inst.idx]
        was_empty = not inst.waiting
        inst.waiting.append(q)
        if inst.plan is None:
            schedule(inst, t)
        elif was_empty:
            end = inst.truncate(t)
            if end is not None:
                tie += 1
                push(heap, (end, tie, _STEP, inst, inst.ver))

    def migrate(q: Seq, src: Instance, dst: Instance, t: float) -> None:
        nonlocal tie
        src.remove(q)
        q.migrations += 1
        link = spec.link_between(src.spec.node, dst.spec.node) or spec.links.get(src.spec.node)
        kv_bytes = q.computed * spec.model.kv_bytes_per_token
        t_kv = link.transfer_s(kv_bytes) if link else 0.0
        t_re = (link.latency if link else 0.0) + prefill_time(dst.cost, q.computed, dst.budget)
        if t_kv <= t_re:
            delay = t_kv  # move the KV cache: admitted there without a prefill
        else:
            delay = link.transfer_s((q.prompt + q.gen) * TOKEN_ID_BYTES) if link else 0.0
            q.computed = 0  # send the tokens, recompute their KV there
        ledger.finish(q.i)
        ledger.dispatch(q.info, dst.idx, q.prompt + 2 * q.gen)
        q.watch_at = 0
        w = policy.watch(q.info, dst.idx, views)
        if w:
            q.watch_at = w
        tie += 1
        push(heap, (t + delay, tie, _DELIVER, q, dst))

    def finished(q: Seq) -> None:
        status[q.i] = "done" if q.gen >= q.output else "truncated"
        q.status = status[q.i]
        ledger.finish(q.i)
        policy.on_finish(q.info, q.gen)

    while heap:
        t, _, kind, a, b = pop(heap)
        while t >= tl_next:  # memory and utilisation of every instance on one clock
            for inst in insts:
                inst.sample_timeline(tl_next)
            tl_next += tl_dt
            if len(insts[0].timeline) >= 2 * points:  # the run outlives the clock: halve the samples
                for inst in insts:
                    inst.halve_timeline()
                tl_dt *= 2
        if kind == _STEP:
            inst = a
            if b != inst.ver or inst.plan is None:
                continue
            done, watched = inst.complete(t)
            for q in done:
                finished(q)
            for q in watched:
                q_gen = q.key + inst.step - q.prompt + 1
                target = policy.on_watch(q.info, q_gen, inst.idx, views)
                if target is not None and target != inst.idx:
                    migrate(q, inst, insts[target], t)
            schedule(inst, t)
        elif kind == _ARRIVE:
            i = a
            prompt, output = workload.prompt[i], workload.output[i]
            info = RequestInfo(i, prompt, output if known else None, output if policy.uses_true_lengths else None)
            q = Seq(i, info, prompt, output)
            seqs[i] = q
            idx = policy.choose(info, views)
            if idx is None:
                q.state = DONE
                q.status = "rejected"
                continue
            ledger.dispatch(info, idx, policy.estimate(info))
            w = policy.watch(info, idx, views)
            if w:
                q.watch_at = w
            inst = insts[idx]
            link = spec.link_between(entry, inst.spec.node)
            delay = link.transfer_s(prompt * TOKEN_ID_BYTES) if link else 0.0
            if delay > 0:
                tie += 1
                push(heap, (t + delay, tie, _DELIVER, q, inst))
            else:
                deliver(q, inst, t)
        else:
            deliver(a, b, t)

    stuck = [inst.name for inst in insts if inst.has_work()]
    if stuck:
        raise AssertionError(f"simulation ended with work left on {stuck}")
    for inst in insts:
        inst.sample_timeline(max((q.t_finish for q in seqs if q is not None), default=0.0))
    out = [q for q in seqs if q is not None]
    assert len(out) == n
    for q in out:
        if q.status == "" or q.state != DONE:
            raise AssertionError(f"request {q.i} neither finished nor rejected")
    return SimResult(
        policy=policy.name,
        rate=workload.rate,
        arrival=list(workload.arrival),
        prompt=list(workload.prompt),
        output=list(workload.output),
        klass=list(workload.klass),
        status=[q.status for q in out],
        t_first=[q.t_first + q.lat if q.t_first >= 0 and q.status != "rejected" else -1.0 for q in out],
        t_finish=[q.t_finish + q.lat if q.status != "rejected" else -1.0 for q in out],
        generated=[q.gen if q.status != "rejected" else 0 for q in out],
        instance=[q.inst for q in out],
        preemptions=[q.preemptions for q in out],
        migrations=[q.migrations for q in out],
        instances=[{**s.summary(), "steps": inst.steps, "busy_s": round(inst.busy, 4), "preemptions": inst.preemptions,
                    "max_kv_blocks_used": inst.max_used}
                   for s, inst in zip(spec.instances, insts, strict=True)],
        timelines={inst.name: inst.timeline for inst in insts},
        sim_wall_s=time.perf_counter() - wall0,
        policy_stats={"mispredictions": policy.mispredictions, "migrations": policy.migrations,
                      "long_missed": getattr(policy, "long_missed", 0)},
    )
