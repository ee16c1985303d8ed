"""`mlsyskit hpc blas` and `mlsyskit hpc activations` on tiny sizes: the rows, the flop
counts, the exact saved-for-backward memory, and the files they write."""

import json

from mlsyskit.cli import main
from mlsyskit.hpc.activations import ActivationConfig, run_activations
from mlsyskit.hpc.blas import BlasConfig, run_blas


def test_blas_rows_files_and_unsupported_cases(tmp_path):
    r = run_blas(BlasConfig(sizes=[16, 48], repeat=1, threads=[1], out=str(tmp_path)))
    rows = r["rows"]
    assert len(rows) == 2 * 3 * 2 * 2  # libraries x dtypes x ops x sizes
    timed = [x for x in rows if "gflops" in x]
    for x in timed:
        assert abs(x["gflops"] - 2 * x["n"] ** 3 / x["seconds"] / 1e9) < 1e-9 * x["gflops"]
        words = 3 if x["op"] == "matmul" else 2
        assert x["intensity"] == 2 * x["n"] ** 3 / (words * x["n"] ** 2 * {"float32": 4, "float64": 8, "bfloat16": 2}[x["dtype"]])
        tol = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}[x["dtype"]]
        assert x["max_rel_error"] < tol, x
    unsupported = {(x["library"], x["dtype"], x["op"]): x["unsupported"] for x in rows if "unsupported" in x}
    assert unsupported[("numpy", "bfloat16", "matmul")] == "numpy has no bfloat16"
    assert "BFloat16" in unsupported[("torch", "bfloat16", "inv")]  # torch's own refusal, reported
    assert ("torch", "bfloat16", "matmul") not in unsupported
    assert r["blas"]["numpy"][0]["internal_api"] in ("openblas", "mkl", "blis", "accelerate")
    saved = json.loads((tmp_path / "hpc_blas.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["peak"]["memory_bandwidth_gbs_1thread"] > 0
    assert (tmp_path / "hpc_blas.png").read_bytes()[:4] == b"\x89PNG"


def test_activations_saved_memory_trace_and_plot(tmp_path):
    numel = 50_000
    r = run_activations(ActivationConfig(numel=numel, repeat=2, threads=1, out=str(tmp_path)))
    rows = {x["name"]: x for x in r["rows"]}
    assert list(rows) == ["relu", "sigmoid", "tanh", "gelu", "gelu-tanh", "silu"]
    for name, x in rows.items():
        assert x["saved_bytes"] == 4 * numel, name  # one float32 tensor kept per activation
        assert x["saved"] == (["output"] if name in ("relu", "sigmoid", "tanh") else ["input"]), name
        assert x["forward_ms"] > 0 and x["backward_ms"] > 0 and x["forward_nograd_ms"] > 0
        assert x["profiler_forward_alloc_bytes"] >= 4 * numel  # the output tensor
    trace = json.loads((tmp_path / "hpc_activations_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"relu forward", "gelu-tanh backward", "aten::gelu"} <= names
    assert (tmp_path / "hpc_activations.png").read_bytes()[:4] == b"\x89PNG"


def test_study_commands_print_json_last(tmp_path, capsys):
    assert main(["hpc", "blas", "--sizes", "8", "--libraries", "numpy", "--dtypes", "float64", "--ops", "matmul",
                 "--repeat", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["json"] == str(tmp_path / "hpc_blas.json") and "numpy   float64" in out[1]
    assert main(["hpc", "blas", "--dtypes", "float16", "--out", str(tmp_path)]) == 2
    assert "--dtypes float16: choose from float32,float64,bfloat16" in capsys.readouterr().err
