"""Placement policies: which instance gets the next request.

One small interface, used by the simulator (:mod:`mlsyskit.cluster.sim`) and by the real router
(``mlsyskit router --policy NAME``): a policy sees the request as a router sees it
(:class:`RequestInfo`: prompt tokens and the client's ``max_tokens``; the true output length
only when it is an oracle) and each instance as a router knows it (:class:`InstanceView`: its
capacity, which a ``--replica-spec`` or the cluster spec gives, and the router-side counters
of what it sent there and has not seen finish, kept by :class:`Ledger`). It returns an index,
or ``None`` when no instance can take the request.

Pure Python (``random.Random`` for the random policy, seeded): importing this module costs
nothing and a router can call ``choose`` on every request.

Policies (``POLICIES``):

* ``random``, ``round-robin``: the baselines, over the instances whose context holds the request;
* ``jsq``: join the shortest queue (fewest requests in flight);
* ``lot``: least outstanding tokens, what ``mlsyskit router`` did before policies became
  pluggable: prompt + ``max_tokens`` (128 when the client sets none) of the requests in flight;
* ``length-class``: the scope's policy. A request's total length (prompt + output, from
  ``max_tokens``) makes it short, medium or long; short ones go to the instances with the
  smallest KV memory, long ones to the largest (the NVLink pair as one tensor-parallel
  instance), medium ones anywhere; inside a class, the instance whose outstanding tokens drain
  soonest at its throughput (least outstanding tokens among equally fast instances);
* ``best-fit``: VRAM-aware best fit: the instance whose free KV (capacity - reserved tokens)
  after taking the request is smallest but not negative; none fits: the most free;
* ``oracle``: sees every request's true output length (even when the client does not say it):
  the length classes on the true total, and inside a class the instance where the request's
  work drains soonest ((true outstanding tokens + its own) / the instance's throughput) among
  those with KV room. The reference the others are compared with: a greedy policy with perfect
  length information, not a proven optimum (another policy can beat it at some load);
* ``predict``: for unknown output lengths. It predicts a request's output length online, as a
  quantile of the outputs seen for prompts of the same length bucket (log2 of the prompt
  length; a sliding window per bucket, updated as requests finish), routes as
  the oracle would with that prediction (the bucket's median), and recovers from an
  under-prediction: a request placed on a small instance that has generated more tokens than
  its bucket's outputs say a short one would (the point past which, in the window, most
  requests went on to be long), or that crosses the long-class bound, is moved to the largest
  instance (the simulator costs the move by the link: its KV over the network, or recomputing
  its tokens there, whichever is cheaper).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from mlsyskit.errors import UserError

DEFAULT_MAX_TOKENS = 128  # a router's work estimate when a request gives no max_tokens


@dataclass
class RequestInfo:
    """A request as the router sees it."""

    id: int
    prompt_tokens: int
    max_tokens: int | None = None  # what the client asked; None: up to the context
    output_tokens: int | None = None  # the true output length: only an oracle reads it


@dataclass
class InstanceView:
    """One instance as the router knows it: static capacity plus the ledger's counters."""

    name: str
    kv_tokens: int  # KV cache capacity in tokens
    max_model_len: int  # context: prompt + output
    decode_tok_s: float = 1.0  # one stream's decode speed (relative speeds are what matter)
    throughput_tok_s: float = 1.0  # decode tokens/s with a full batch
    in_flight: int = 0
    outstanding_tokens: int = 0  # prompt + expected output of the requests in flight
    reserved_tokens: int = 0  # the KV footprint the router expects of them (same estimate)
    outstanding_true: int = 0  # prompt + true output: only kept for an oracle
    group: int = 0  # 0 = the smallest KV class ... set by `classify`

    def free_tokens(self) -> int:
        return self.kv_tokens - self.reserved_tokens


def classify(views: list[InstanceView]) -> None:
    """Group instances by KV capacity: group 0 holds the smallest, the last the largest
    (instances within 25 % of each other share a group)."""
    caps = sorted({v.kv_tokens for v in views})
    groups: list[int] = []
    for c in caps:
        if not groups or c > groups[-1] * 1.25:
            groups.append(c)
    for v in views:
        v.group = max(i for i, g in enumerate(groups) if v.kv_tokens >= g)


class Ledger:
    """The router-side counters behind every :class:`InstanceView`: what was sent where and has
    not finished. Both the simulator and the real router keep one."""

    def __init__(self, views: list[InstanceView]) -> None:
        self.views = views
        self._open: dict[int, tuple[int, int, int]] = {}  # request id -> (index, estimate, true)

    def dispatch(self, req: RequestInfo, index: int, estimate: int) -> None:
        true = req.prompt_tokens + (req.output_tokens or 0)
        v = self.views[index]
        v.in_flight += 1
        v.outstanding_tokens += estimate
        v.reserved_tokens += estimate
        v.outstanding_true += true
        self._open[req.id] = (index, estimate, true)

    def finish(self, req_id: int) -> int | None:
        """The request is done (or gone): take it off its instance; that instance's index."""
        entry = self._open.pop(req_id, None)
        if entry is None:
            return None
        index, est, true = entry
        v = self.views[index]
        v.in_flight -= 1
        v.outstanding_tokens -= est
        v.reserved_tokens -= est
        v.outstanding_true -= true
        return index

    def where(self, req_id: int) -> int | None:
        entry = self._open.get(req_id)
        return None if entry is None else entry[0]


# ------------------------------------------------------------------------------------------
# The interface
# ------------------------------------------------------------------------------------------


class Policy:
    """Base class: subclasses implement :meth:`choose`; the hooks default to doing nothing."""

    name = ""
    uses_true_lengths = False  # only the oracle

    def __init__(self, seed: int = 0, **options: Any) -> None:
        self.seed = seed
        self.options = options
        self.mispredictions = 0
        self.migrations = 0

    def estimate(self, req: RequestInfo) -> int:
        """The tokens this request counts for in the ledger (prompt + expected output)."""
        return req.prompt_tokens + (req.max_tokens if req.max_tokens else DEFAULT_MAX_TOKENS)

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        raise NotImplementedError

    def watch(self, req: RequestInfo, index: int, views: list[InstanceView]) -> int | None:
        """After dispatching ``req`` to ``views[index]``: an output-token count at which the
        simulator calls :meth:`on_watch`, or None."""
        return None

    def on_watch(self, req: RequestInfo, generated: int, index: int, views: list[InstanceView]) -> int | None:
        """``req`` has generated ``generated`` tokens on ``views[index]``: an instance to move
        it to, or None to leave it."""
        return None

    def on_finish(self, req: RequestInfo, output_tokens: int) -> None:
        """``req`` finished with ``output_tokens`` tokens (what a router sees in ``usage``)."""


def eligible(req: RequestInfo, views: list[InstanceView]) -> list[int]:
    """Instances whose context holds the request: prompt + max_tokens (when given) within
    max_model_len, at least one token left to generate otherwise."""
    need = req.prompt_tokens + (req.max_tokens or 1)
    return [i for i, v in enumerate(views) if need <= v.max_model_len]


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)
        self.rng = random.Random(seed)

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        cands = eligible(req, views)
        return cands[self.rng.randrange(len(cands))] if cands else None


class RoundRobinPolicy(Policy):
    name = "round-robin"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)
        self.next = 0

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        n = len(views)
        need = req.prompt_tokens + (req.max_tokens or 1)
        for k in range(n):
            i = (self.next + k) % n
            if need <= views[i].max_model_len:
                self.next = (i + 1) % n
                return i
        return None


class JSQPolicy(Policy):
    name = "jsq"

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        cands = eligible(req, views)
        return min(cands, key=lambda i: (views[i].in_flight, views[i].outstanding_tokens, i)) if cands else None


class LOTPolicy(Policy):
    """Least outstanding tokens, ties to fewer requests in flight, then rotating (the router's)."""

    name = "lot"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)
        self.turn = 0

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        cands = eligible(req, views)
        if not cands:
            return None
        n, k = len(views), self.turn
        self.turn += 1
        return min(cands, key=lambda i: (views[i].outstanding_tokens, views[i].in_flight, (i - k) % n))


def _drain_time(v: InstanceView, extra: int, true: bool = False) -> float:
    work = (v.outstanding_true if true else v.outstanding_tokens) + extra
    return work / max(v.throughput_tok_s, 1e-9)


def least_work(cands: list[int], views: list[InstanceView], tokens: int, true: bool = False) -> int:
    """Among ``cands``: the instance with KV room for ``tokens`` whose work drains soonest;
    when none has room, the one that drains soonest anyway."""
    room = [i for i in cands if views[i].free_tokens() >= tokens] or cands
    return min(room, key=lambda i: (_drain_time(views[i], tokens, true), i))


def least_drain(cands: list[int], views: list[InstanceView]) -> int:
    """Among ``cands``: the instance whose outstanding tokens drain soonest at its throughput
    (least outstanding tokens when the instances are equally fast), then fewest in flight,
    then the first."""
    return min(cands, key=lambda i: (_drain_time(views[i], 0), views[i].in_flight, i))


class LengthClassPolicy(Policy):
    """The scope's rule: short requests on the small-memory instances, long ones on the largest,
    medium ones anywhere; inside a class, the instance whose outstanding tokens drain soonest at
    its throughput (a faster instance, such as a tensor-parallel pair, takes more of the medium
    ones; with equally fast instances this is least outstanding tokens).

    Options: ``short_max`` and ``long_min`` (total tokens, prompt + output; defaults: long
    above a quarter of the smallest instance's KV capacity, short up to a quarter of that)."""

    name = "length-class"
    balance = staticmethod(least_drain)

    _thr: tuple[int, int, tuple[int, int]] | None = None

    def thresholds(self, views: list[InstanceView]) -> tuple[int, int]:
        key = (id(views), len(views))
        if self._thr is not None and self._thr[:2] == key:
            return self._thr[2]
        classify(views)  # a new set of instances: (re)group them by KV capacity
        smallest = min(v.kv_tokens for v in views)
        long_min = int(self.options.get("long_min") or max(2, smallest // 4))
        short_max = int(self.options.get("short_max") or max(1, long_min // 4))
        self._thr = (*key, (short_max, long_min))
        return short_max, long_min

    def total(self, req: RequestInfo) -> int:
        return req.prompt_tokens + (req.max_tokens if req.max_tokens else DEFAULT_MAX_TOKENS)

    def pool(self, req: RequestInfo, total: int, views: list[InstanceView]) -> list[int]:
        """The instances of the request's class (whose context holds ``total`` tokens when any)."""
        short_max, long_min = self.thresholds(views)
        cands = [i for i in eligible(req, views) if total <= views[i].max_model_len] or eligible(req, views)
        if not cands:
            return []
        if total > long_min:
            top = max(views[i].group for i in cands)
            return [i for i in cands if views[i].group == top]
        if total <= short_max:
            low = min(views[i].group for i in cands)
            return [i for i in cands if views[i].group == low]
        return cands

    def place(self, req: RequestInfo, total: int, views: list[InstanceView]) -> int | None:
        cands = self.pool(req, total, views)
        return self.balance(cands, views) if cands else None

    def estimate(self, req: RequestInfo) -> int:
        return self.total(req)

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        return self.place(req, self.total(req), views)


class BestFitPolicy(Policy):
    """VRAM-aware best fit on the router's KV reservation estimate."""

    name = "best-fit"

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        cands = eligible(req, views)
        if not cands:
            return None
        need = self.estimate(req)
        fit = [i for i in cands if views[i].free_tokens() >= need]
        if fit:
            return min(fit, key=lambda i: (views[i].free_tokens() - need, i))
        return max(cands, key=lambda i: (views[i].free_tokens() / max(views[i].kv_tokens, 1), -i))


class OraclePolicy(LengthClassPolicy):
    """Sees every request's true output length. The length classes of ``length-class`` on the
    true total, and inside a class the instance where the request's true work drains soonest
    ((true outstanding tokens + its own) / the instance's throughput) among those with KV room."""

    name = "oracle"
    uses_true_lengths = True

    def total(self, req: RequestInfo) -> int:
        out = req.output_tokens if req.output_tokens is not None else (req.max_tokens or DEFAULT_MAX_TOKENS)
        return req.prompt_tokens + out

    def place(self, req: RequestInfo, total: int, views: list[InstanceView]) -> int | None:
        cands = self.pool(req, total, views)
        return least_work(cands, views, total, true=True) if cands else None


class OutputLengthPredictor:
    """Output length as a quantile of what finished requests with prompts of the same length
    bucket produced (bucket = floor(log2(prompt tokens))); a sliding window of the last
    ``window`` outputs per bucket, and one over all buckets for buckets not yet seen."""

    def __init__(self, quantile: float = 0.9, window: int = 256, default: int = DEFAULT_MAX_TOKENS, min_samples: int = 8) -> None:
        if not 0.0 < quantile <= 1.0:
            raise UserError(f"predictor quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        self.window = window
        self.default = default
        self.min_samples = min_samples
        self._recent: dict[int, deque[int]] = {}
        self._sorted: dict[int, list[int]] = {}
        self._all_recent: deque[int] = deque()
        self._all_sorted: list[int] = []

    @staticmethod
    def bucket(prompt_tokens: int) -> int:
        return max(0, int(prompt_tokens).bit_length() - 1)

    def _add(self, recent: deque[int], ordered: list[int], value: int) -> None:
        recent.append(value)
        bisect.insort(ordered, value)
        if len(recent) > self.window:
            old = recent.popleft()
            del ordered[bisect.bisect_left(ordered, old)]

    def observe(self, prompt_tokens: int, output_tokens: int) -> None:
        b = self.bucket(prompt_tokens)
        self._add(self._recent.setdefault(b, deque()), self._sorted.setdefault(b, []), int(output_tokens))
        self._add(self._all_recent, self._all_sorted, int(output_tokens))

    def _window(self, prompt_tokens: int) -> list[int]:
        ordered = self._sorted.get(self.bucket(prompt_tokens), [])
        return ordered if len(ordered) >= self.min_samples else self._all_sorted

    def predict(self, prompt_tokens: int) -> int:
        ordered = self._window(prompt_tokens)
        if not ordered:
            return self.default
        k = min(len(ordered) - 1, max(0, math.ceil(self.quantile * len(ordered)) - 1))
        return ordered[k]

    def decision_point(self, prompt_tokens: int, long_output: int) -> int:
        """The fewest generated tokens after which, among the outputs seen for this prompt
        bucket, at least half of those that got this far went on to ``long_output`` tokens or
        more: the point where a request is more likely long than not. ``long_output`` when no
        such output has been seen."""
        ordered = self._window(prompt_tokens)
        n = len(ordered)
        n_long = n - bisect.bisect_left(ordered, long_output)
        if n_long == 0:
            return long_output
        # outputs >= g must number at most 2 * n_long: g = the (n - 2 n_long)-th smallest
        k = n - 2 * n_long
        return max(1, min(long_output, ordered[k] if k > 0 else 1))


class PredictPolicy(LengthClassPolicy):
    """Length classes on predicted output lengths, with recovery (see the module docs).

    The oracle's rule on predicted lengths: length classes on the prompt plus the ``quantile``
    (0.5) of the outputs seen for the prompt's length bucket, and inside a class the instance
    whose (estimated) work drains soonest among those with KV room.
    A request placed below the largest instances is watched: once it has generated as many
    tokens as its bucket's :meth:`OutputLengthPredictor.decision_point` (more likely long than
    not, learned from the same window) or it crosses the long-class bound, it moves to the
    largest instance with the least drain time. Options: ``quantile``, ``window`` (256 outputs
    per bucket), ``recover`` (True), plus ``short_max`` / ``long_min`` as for ``length-class``."""

    name = "predict"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)
        self.predictor = OutputLengthPredictor(float(options.get("quantile", 0.5)), int(options.get("window", 256)))
        self.recover = bool(options.get("recover", True))
        self._predicted: dict[int, int] = {}  # request id -> predicted total tokens
        self.long_missed = 0
        self._views: list[InstanceView] | None = None

    def expected_output(self, req: RequestInfo) -> int:
        p = self.predictor.predict(req.prompt_tokens)
        if req.max_tokens:
            p = min(p, req.max_tokens)
        return max(1, p)

    def estimate(self, req: RequestInfo) -> int:
        return req.prompt_tokens + self.expected_output(req)

    def choose(self, req: RequestInfo, views: list[InstanceView]) -> int | None:
        self._views = views
        total = req.prompt_tokens + self.expected_output(req)
        self._predicted[req.id] = total
        cands = self.pool(req, total, views)
        return least_work(cands, views, total) if cands else None

    def watch(self, req: RequestInfo, index: int, views: list[InstanceView]) -> int | None:
        if not self.recover:
            return None
        top = max(v.group for v in views)
        if views[index].group == top:
            return None
        _, long_min = self.thresholds(views)
        bound = min(long_min, views[index].max_model_len - 1) - req.prompt_tokens
        if bound <= 1:
            return None
        return min(bound, self.predictor.decision_point(req.prompt_tokens, bound))

    def on_watch(self, req: RequestInfo, generated: int, index: int, views: list[InstanceView]) -> int | None:
        top = max(v.group for v in views)
        cands = [i for i, v in enumerate(views) if v.group == top and i != index
                 and req.prompt_tokens + generated + 1 < v.max_model_len]
        if not cands:
            return None
        self.migrations += 1
        return least_work(cands, views, req.prompt_tokens + generated)

    def on_finish(self, req: RequestInfo, output_tokens: int) -> None:
        predicted = self._predicted.pop(req.id, None)
        if predicted is not None and self._views is not None:
            short_max, long_min = self.thresholds(self._views)

            def klass(total: int) -> int:
                return 0 if total <= short_max else 2 if total > long_min else 1

            true = klass(req.prompt_tokens + output_tokens)
            if klass(predicted) != true:
                self.mispredictions += 1
                if true == 2:
                    self.long_missed += 1
        self.predictor.observe(req.prompt_tokens, output_tokens)


POLICIES: dict[str, type[Policy]] = {
    p.name: p
    for p in (RandomPolicy, RoundRobinPolicy, JSQPolicy, LOTPolicy, LengthClassPolicy, BestFitPolicy, OraclePolicy, PredictPolicy)
}


def make_policy(name: str, seed: int = 0, **options: Any) -> Policy:
    """A policy by name (see ``POLICIES``); options are the policy's keyword settings."""
    cls = POLICIES.get(name)
    if cls is None:
        raise UserError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return cls(seed, **options)
