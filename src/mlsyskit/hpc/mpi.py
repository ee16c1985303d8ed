"""MPI for the `mlsyskit hpc` commands: mpi4py over the MPICH that pip installs (the `mpich`
wheel), started with `mpiexec -n P mlsyskit hpc ...` (the venv's mpiexec). Without mpiexec a
command runs as a world of one rank.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mlsyskit.errors import UserError


def world() -> Any:
    """MPI.COMM_WORLD (mpi4py imported on first use)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UserError(
            f"MPI is not available ({e}); install it with `pip install mpi4py mpich` "
            "(the Makefile does), then run `mpiexec -n 2 mlsyskit hpc ...`"
        ) from None
    return MPI.COMM_WORLD


def mpi_module() -> Any:
    from mpi4py import MPI

    return MPI


def library() -> str:
    """The MPI library's first version line, e.g. 'MPICH Version: 4.3.0'."""
    text = mpi_module().Get_library_version().strip().splitlines()
    return " ".join(text[0].split()) if text else "unknown"


def report(comm: Any, summary: str, result: dict[str, Any]) -> None:
    """Rank 0 prints the readable summary, then the JSON object as the last line."""
    if comm.Get_rank() == 0:
        print(summary)
        print(json.dumps(result))
        sys.stdout.flush()


def fail_all(comm: Any, error: str | None) -> None:
    """Collective: if any rank had a user error, every rank raises it (rank 0's, else the
    first failing rank's), so no rank is left waiting in a collective."""
    errors = comm.allgather(error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)
