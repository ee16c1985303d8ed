"""`mlsyskit hpc taylor`: a Taylor series split over MPI ranks, combined three ways.

The N terms are split in contiguous blocks (rank r sums terms [r*N/P, (r+1)*N/P)); the partial
sums are combined by MPI_Reduce to rank 0, by MPI_Allreduce, or by a hand-written binomial
tree of MPI_Send/MPI_Recv (log2 P rounds). Compute and communication are timed apart (a
barrier between them, so waiting for a slow rank is not counted as communication).

Terms (k counted from 0): exp x = sum x^k/k!; sin x = sum (-1)^k x^(2k+1)/(2k+1)!;
ln(1+x) = sum (-1)^k x^(k+1)/(k+1), for -1 < x <= 1.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlsyskit.errors import UserError
from mlsyskit.hpc import mpi

FUNCTIONS = {"exp": math.exp, "sin": math.sin, "ln1p": math.log1p}
METHODS = ("reduce", "allreduce", "sendrecv")
CHUNK = 1 << 20  # terms per numpy block: bounded memory for any N


def _first_term(function: str, x: float, k: int) -> float:
    """Term k computed directly (in logs, so a late block starts without overflow)."""
    if function == "exp":
        if x == 0:
            return 1.0 if k == 0 else 0.0
        mag = k * math.log(abs(x)) - math.lgamma(k + 1)
        return math.copysign(math.exp(mag) if mag > -745 else 0.0, x if k % 2 else 1.0)
    if function == "sin":
        if x == 0:
            return 0.0
        mag = (2 * k + 1) * math.log(abs(x)) - math.lgamma(2 * k + 2)
        val = math.exp(mag) if mag > -745 else 0.0
        return (-1) ** k * math.copysign(val, x)
    if x == 0:
        return 0.0
    return (-1) ** k * x ** (k + 1) / (k + 1)


def partial_sum(function: str, x: float, start: int, stop: int) -> float:
    """Sum of terms [start, stop): the first one directly, the rest by the recurrence
    t_{k+1} = t_k * ratio_k as cumulative products, in blocks of CHUNK terms."""
    total = []
    k = start
    t = _first_term(function, x, start) if start < stop else 0.0
    while k < stop:
        n = min(CHUNK, stop - k)
        ks = np.arange(k, k + n, dtype=np.float64)
        if function == "ln1p":
            terms = np.power(-1.0, ks) * np.power(x, ks + 1) / (ks + 1)
        else:
            if function == "exp":
                ratio = x / (ks[:-1] + 1)
            else:  # sin: t_{k+1} = -t_k x^2 / ((2k+2)(2k+3))
                ratio = -x * x / ((2 * ks[:-1] + 2) * (2 * ks[:-1] + 3))
            terms = np.empty(n)
            terms[0] = t
            np.cumprod(ratio, out=terms[1:])
            terms[1:] *= t
            ratio_last = (x / (k + n)) if function == "exp" else (-x * x / ((2 * (k + n - 1) + 2) * (2 * (k + n - 1) + 3)))
            t = float(terms[-1]) * ratio_last
        total.append(float(terms.sum()))
        k += n
    return math.fsum(total)


def combine(comm: Any, value: float, method: str) -> float:
    """The sum of every rank's ``value``: on rank 0 (reduce, sendrecv) or on all (allreduce)."""
    MPI = mpi.mpi_module()
    send = np.array([value], dtype=np.float64)
    recv = np.zeros(1, dtype=np.float64)
    if method == "reduce":
        comm.Reduce(send, recv, op=MPI.SUM, root=0)
        return float(recv[0])
    if method == "allreduce":
        comm.Allreduce(send, recv, op=MPI.SUM)
        return float(recv[0])
    # binomial tree: in round s, ranks with rank % 2s == s send to rank - s and are done
    rank, size = comm.Get_rank(), comm.Get_size()
    step = 1
    while step < size:
        if rank % (2 * step) == step:
            comm.Send(send, dest=rank - step, tag=step)
            break
        if rank % (2 * step) == 0 and rank + step < size:
            comm.Recv(recv, source=rank + step, tag=step)
            send[0] += recv[0]
        step *= 2
    return float(send[0])


@dataclass
class TaylorConfig:
    function: str = "exp"
    x: float = 1.0
    terms: int = 20
    method: str = "reduce"
    repeat: int = 5

    def validate(self) -> None:
        if self.function not in FUNCTIONS:
            raise UserError(f"unknown function {self.function!r}; use exp, sin or ln1p")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; use reduce, allreduce or sendrecv")
        if self.terms < 1:
            raise UserError(f"--terms must be at least 1, got {self.terms}")
        if self.repeat < 1:
            raise UserError(f"--repeat must be at least 1, got {self.repeat}")
        if not math.isfinite(self.x):
            raise UserError(f"--x must be a finite number, got {self.x}")
        if self.function == "ln1p" and not -1 < self.x <= 1:
            raise UserError(f"the series of ln(1+x) converges only for -1 < x <= 1; got --x {self.x}")
        if self.function == "exp" and self.x > 709:
            raise UserError(f"exp({self.x}) overflows a float64; use --x <= 709")


def run_taylor(cfg: TaylorConfig) -> dict[str, Any]:
    """Run on every rank; the result (meaningful on rank 0)."""
    comm = mpi.world()
    error = None
    try:
        cfg.validate()
    except UserError as e:
        error = str(e)
    mpi.fail_all(comm, error)
    MPI = mpi.mpi_module()
    rank, size = comm.Get_rank(), comm.Get_size()
    start, stop = rank * cfg.terms // size, (rank + 1) * cfg.terms // size
    compute, comm_s = [], []
    value = 0.0
    for _ in range(cfg.repeat):
        comm.Barrier()
        t0 = MPI.Wtime()
        part = partial_sum(cfg.function, cfg.x, start, stop)
        t1 = MPI.Wtime()
        comm.Barrier()  # stragglers: waited for here, not counted as communication
        t2 = MPI.Wtime()
        value = combine(comm, part, cfg.method)
        t3 = MPI.Wtime()
        # slowest rank per repeat: the time the job actually took
        c, m = comm.allreduce(t1 - t0, op=MPI.MAX), comm.allreduce(t3 - t2, op=MPI.MAX)
        compute.append(c)
        comm_s.append(m)
    exact = FUNCTIONS[cfg.function](cfg.x)
    compute_s, comm_med = statistics.median(compute), statistics.median(comm_s)
    return {
        "function": cfg.function, "x": cfg.x, "terms": cfg.terms, "method": cfg.method, "ranks": size,
        "value": value, "exact": exact, "abs_error": abs(value - exact),
        "rel_error": abs(value - exact) / abs(exact) if exact else None,
        "compute_s": compute_s, "comm_s": comm_med, "compute_s_min": min(compute), "comm_s_min": min(comm_s),
        "comm_fraction": comm_med / (compute_s + comm_med) if compute_s + comm_med > 0 else None,
        "repeat": cfg.repeat, "mpi": mpi.library(),
    }


def summary_line(r: dict[str, Any]) -> str:
    us = lambda s: f"{s * 1e6:,.1f} us"  # noqa: E731
    return (f"{r['function']}({r['x']:g}) ~= {r['value']!r} with {r['terms']:,} terms on {r['ranks']} rank(s) "
            f"({r['method']}): exact {r['exact']!r}, |error| {r['abs_error']:.3g}; compute {us(r['compute_s'])}, "
            f"communication {us(r['comm_s'])} ({100 * r['comm_fraction']:.0f}% of the time, median of {r['repeat']})")
