"""`mlsyskit hpc taylor` under mpiexec (2 ranks, 3 ways to combine) and the term sums."""

import math

import pytest

from mlsyskit.hpc.taylor import partial_sum


@pytest.mark.parametrize(("function", "x", "n"), [("exp", 1.0, 30), ("exp", -3.5, 80), ("sin", 2.0, 30),
                                                   ("sin", -8.0, 60), ("ln1p", 0.5, 200), ("ln1p", -0.3, 200)])
def test_blocks_add_up_to_the_function(function, x, n):
    exact = {"exp": math.exp, "sin": math.sin, "ln1p": math.log1p}[function](x)
    whole = partial_sum(function, x, 0, n)
    assert whole == pytest.approx(exact, rel=1e-9, abs=1e-12)
    cuts = [0, 3, n // 2, n // 2 + 1, n]  # uneven blocks, one of a single term
    blocks = sum(partial_sum(function, x, a, b) for a, b in zip(cuts, cuts[1:], strict=False))
    assert blocks == pytest.approx(whole, rel=1e-12, abs=1e-14)


def test_blocks_past_the_chunk_size_and_late_starts():
    # ln(1+x) at x = 1 converges slowly: the error after N terms is about 1/(2N)
    n = (1 << 20) + 12345
    assert abs(partial_sum("ln1p", 1.0, 0, n) - math.log(2)) == pytest.approx(1 / (2 * n), rel=1e-3)
    # a block that starts at term 200 of exp(50) starts from the term computed in logs
    assert partial_sum("exp", 50.0, 0, 200) + partial_sum("exp", 50.0, 200, 400) == pytest.approx(math.exp(50), rel=1e-13)


@pytest.mark.parametrize("method", ["reduce", "allreduce", "sendrecv"])
def test_two_ranks_each_method(mpi_json, method):
    r = mpi_json(2, ["taylor", "--function", "sin", "--x", "1.3", "--terms", "40", "--method", method, "--repeat", "3"])
    assert r["ranks"] == 2 and r["method"] == method and r["terms"] == 40
    assert r["exact"] == math.sin(1.3) and r["abs_error"] < 1e-14 and abs(r["value"] - r["exact"]) == r["abs_error"]
    assert r["compute_s"] > 0 and r["comm_s"] > 0 and 0 < r["comm_fraction"] < 1
    assert r["mpi"].startswith("MPICH")


def test_bad_input_one_line_from_rank_0(mpiexec):
    proc = mpiexec(2, ["taylor", "--function", "ln1p", "--x", "2"], expect=2)
    assert proc.stderr.count("error:") == 1 and "converges only for -1 < x <= 1" in proc.stderr
    assert proc.stdout == ""
