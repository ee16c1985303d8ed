"""Autoscaling decisions for `mlsyskit serve --autoscale MIN..MAX`.

A pure decision rule, kept apart from the processes it scales so it can be tested on its own:
`Autoscaler.decide(observation)` returns +1 (add a replica), -1 (drain and remove one) or 0.

Signals, both measured: the number of requests *waiting* (queued, not yet running) per replica,
from each replica's /health, and the p90 end-to-end latency the router saw over its recent
window. Hysteresis keeps it from flapping:

* separate thresholds: scale up when queue/replica >= `up_threshold` (or p90 >= `latency_up_s`),
  scale down only when queue/replica <= `down_threshold` (and p90 <= `latency_down_s`);
* consecutive observations: `up_after` in a row for up, `down_after` in a row for down (a single
  burst does not add a replica, a single quiet poll does not remove one);
* a cooldown of `cooldown` seconds after each change, so the effect of the last change (a new
  replica needs seconds to load its model) is measured before the next one.

The replica count is always kept within [min, max]: below min it asks for +1 at once (e.g.
after a replica died), above max -1, whatever the streaks and the cooldown say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlsyskit.errors import UserError


@dataclass(frozen=True)
class Observation:
    """What the scaling loop measured at time `t` (monotonic seconds)."""

    t: float
    replicas: int  # replicas in rotation (ready, not draining)
    queue_depth: float  # requests waiting, summed over the replicas
    p90_latency_s: float | None = None  # router-side, recent window; None: no finished request

    @property
    def queue_per_replica(self) -> float:
        return self.queue_depth / max(1, self.replicas)


def parse_range(text: str) -> tuple[int, int]:
    """'MIN..MAX' (or a single N) -> (min, max); UserError on anything else."""
    s = str(text).strip()
    lo_s, sep, hi_s = s.partition("..")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise UserError(f"--autoscale must be MIN..MAX with integers, e.g. 1..4; got {text!r}") from None
    if lo < 1 or hi < lo:
        raise UserError(f"--autoscale needs 1 <= MIN <= MAX; got {text!r}")
    return lo, hi


class Autoscaler:
    """Hysteresis scaling rule over `Observation`s (see the module docstring)."""

    def __init__(
        self,
        min_replicas: int,
        max_replicas: int,
        up_threshold: float = 2.0,
        down_threshold: float = 0.0,
        up_after: int = 2,
        down_after: int = 5,
        cooldown: float = 10.0,
        latency_up_s: float | None = None,
        latency_down_s: float | None = None,
    ) -> None:
        if min_replicas < 1 or max_replicas < min_replicas:
            raise UserError(f"autoscale needs 1 <= min <= max, got {min_replicas}..{max_replicas}")
        if down_threshold >= up_threshold:
            raise UserError(f"autoscale down_threshold ({down_threshold}) must be below up_threshold ({up_threshold})")
        if up_after < 1 or down_after < 1 or cooldown < 0:
            raise UserError("autoscale up_after and down_after must be >= 1 and cooldown >= 0")
        if latency_up_s is not None and latency_down_s is not None and latency_down_s >= latency_up_s:
            raise UserError("autoscale latency_down_s must be below latency_up_s")
        self.min = min_replicas
        self.max = max_replicas
        self.up_threshold = up_threshold
        self.down_threshold = down_threshold
        self.up_after = up_after
        self.down_after = down_after
        self.cooldown = cooldown
        self.latency_up_s = latency_up_s
        self.latency_down_s = latency_down_s
        self.up_streak = 0
        self.down_streak = 0
        self.last_change = -math.inf
        self.reason = ""  # why the last non-zero decision was taken

    def _hot(self, obs: Observation) -> bool:
        if obs.queue_per_replica >= self.up_threshold:
            return True
        return self.latency_up_s is not None and obs.p90_latency_s is not None and obs.p90_latency_s >= self.latency_up_s

    def _cold(self, obs: Observation) -> bool:
        if obs.queue_per_replica > self.down_threshold:
            return False
        if self.latency_down_s is None or obs.p90_latency_s is None:
            return True
        return obs.p90_latency_s <= self.latency_down_s

    def decide(self, obs: Observation) -> int:
        """+1, -1 or 0 for this observation; updates the streaks and, on a change, the cooldown
        clock (the caller reports a change it could not carry out with `cancel`)."""
        if obs.replicas < self.min:
            return self._change(obs, +1, f"{obs.replicas} replicas < min {self.min}")
        if obs.replicas > self.max:
            return self._change(obs, -1, f"{obs.replicas} replicas > max {self.max}")
        hot, cold = self._hot(obs), self._cold(obs)
        self.up_streak = self.up_streak + 1 if hot else 0
        self.down_streak = self.down_streak + 1 if cold and not hot else 0
        if obs.t - self.last_change < self.cooldown:
            return 0
        if self.up_streak >= self.up_after and obs.replicas < self.max:
            return self._change(obs, +1, f"queue/replica {obs.queue_per_replica:.2f}, p90 {_fmt(obs.p90_latency_s)} for {self.up_streak} polls")
        if self.down_streak >= self.down_after and obs.replicas > self.min:
            return self._change(obs, -1, f"queue/replica {obs.queue_per_replica:.2f}, p90 {_fmt(obs.p90_latency_s)} for {self.down_streak} polls")
        return 0

    def _change(self, obs: Observation, step: int, reason: str) -> int:
        self.up_streak = self.down_streak = 0
        self.last_change = obs.t
        self.reason = reason
        return step

    def cancel(self) -> None:
        """The last change could not be made (e.g. the new replica failed to start): no cooldown."""
        self.last_change = -math.inf


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"
