"""`mlsyskit quantize`, `mlsyskit perplexity` and `mlsyskit generate --model DIR`, for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mlsyskit.cli import build_parser, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlsyskit.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, sample_text_file: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-int3-awq"
    r = _run("quantize", "--model", str(tiny_llama_dir), "--bits", "3", "--group-size", "32",
             "--method", "awq", "--calib", str(sample_text_file), "--calib-windows", "4",
             "--calib-window-len", "64", "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["label"] == "int3-g32-asym-awq" and summary["out"] == str(out)
    assert summary["calibration"] == {"text": str(sample_text_file), "windows": 4, "window": 64}
    return out


def test_quantize_perplexity_generate(awq_dir: Path, tiny_llama_dir: Path, sample_text_file: Path) -> None:
    assert sorted(p.name for p in awq_dir.iterdir()) == [
        "config.json", "model.safetensors", "quant_config.json", "tokenizer.json", "tokenizer_config.json",
    ]
    r = _run("perplexity", "--model", str(awq_dir), "--text", str(sample_text_file),
             "--window", "128", "--max-tokens", "300", "--threads", "1")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)
    assert q["bits_per_weight"] == pytest.approx(3 + 19 / 32)  # 3-bit codes + fp16 scale + 3-bit zero per 32
    assert q["tokens"] == 300 - 3 and q["windows"] == 3 and q["stride"] == 128
    assert q["file_bytes"] == sum(p.stat().st_size for p in awq_dir.iterdir())
    assert q["file_type"] == "int3-g32-asym-awq" and q["perplexity"] > 1
    n_params = sum(t.numel() for t in load_file(str(tiny_llama_dir / "model.safetensors")).values())
    assert q["model_bytes"] < 0.7 * 4 * n_params  # below the fp32 model's bytes
    r = _run("generate", "--model", str(awq_dir), "--prompt", "Hello", "--max-tokens", "5",
             "--temperature", "0", "--stats", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "generated" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "--bits", "5"], "bits must be one of [8, 4, 3, 2], got 5"),
        (["quantize", "--group-size", "48", "--exact-group-size"], "group_size 48 does not divide in_features 64"),
        (["quantize", "--group-size", "0"], "group_size must be a positive integer"),
        (["quantize", "--method", "awq", "--calib", "{tmp}/missing.txt"], "does not exist"),
        (["quantize", "--calib", "{tmp}/missing.txt"], "only used by the calibrated methods"),
        (["quantize", "--act-order"], "only used by --method gptq or awq-gptq"),
        (["quantize", "--out", "{tmp}"], "already exists"),
        (["quantize", "--method", "gptq2"], "invalid choice: 'gptq2'"),
        (["quantize", "--preset", "q3", "--budget", "9"], "--preset q3 sets --budget"),
        (["perplexity", "--text", "{tmp}/missing.txt"], "does not exist"),
        (["perplexity", "--stride", "600"], "stride must be in [1, window=512]"),
        (["perplexity", "--quantization", "int5"], "unknown quantization"),
        (["perplexity", "--activations", "llama.cpp"], "needs a GGUF file with block-quantized weights"),
        (["perplexity", "--activations", "llama.cpp", "--quantization", "int8"], "leave out --quantization and --dtype"),
    ],
    ids=["bits-5", "group-not-dividing", "group-0", "missing-calib", "calib-without-awq",
         "act-order-without-gptq", "out-exists", "bad-method", "preset-overridden", "missing-text", "bad-stride", "bad-spec",
         "llama-cpp-activations-of-float-weights", "llama-cpp-activations-with-quantization"],
)
def test_bad_configs_are_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path, tiny_llama_dir: Path, sample_text_file: Path, capsys: pytest.CaptureFixture) -> None:
    # In-process (main() is what the console script runs): a subprocess each would cost seconds.
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    args += ["--model", str(tiny_llama_dir)]
    if args[0] == "quantize" and "--out" not in args:
        args += ["--out", str(tmp_path / "q")]
    if args[0] == "perplexity" and "--text" not in args:
        args += ["--text", str(sample_text_file)]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("command", ["quantize", "perplexity"])
def test_help_gives_every_flag_a_default(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = [a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 9
    for action in flags:
        assert action.option_strings[-1] in text
    assert text.count("(default") + text.count("(required") >= len(flags) - 1  # --symmetric/--asymmetric share a line


def test_quantized_dir_refuses_bfloat16(awq_dir: Path, sample_text_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["perplexity", "--model", str(awq_dir), "--text", str(sample_text_file), "--dtype", "bfloat16"]) == 2
    assert "computes in float32" in capsys.readouterr().err


def test_quantization_of_a_quantized_dir_is_refused(awq_dir: Path, sample_text_file: Path, capsys: pytest.CaptureFixture) -> None:
    # issue 19 item 14: --quantization int8 on a quantized directory was silently ignored
    assert main(["perplexity", "--model", str(awq_dir), "--text", str(sample_text_file), "--quantization", "int8",
                 "--max-tokens", "50", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is already quantized; leave out --quantization" in err[0], err
    r = _run("generate", "--model", str(awq_dir), "--quantization", "int8", "--prompt", "Hello",
             "--max-tokens", "2", "--threads", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"mlsyskit generate: error: {awq_dir} is already quantized; "
                                             "leave out --quantization (quantization=) or quantize the original model"]
    assert main(["quantize", "--model", str(awq_dir), "--out", str(awq_dir.parent / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_quantize_help_does_not_offer_a_quantized_dir(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    model_help = text[text.index("--model PATH the model"):text.index("--out DIR the directory")]
    assert "a .gguf file or a Hugging Face directory" in model_help
    assert "or a quantized directory" not in model_help and "not a directory `mlsyskit quantize` wrote" in model_help


def test_preset_q4_names_its_recipe(tmp_path: Path, tiny_llama_dir: Path, sample_text_file: Path) -> None:
    r = _run("quantize", "--model", str(tiny_llama_dir), "--preset", "q4", "--calib", str(sample_text_file),
             "--calib-windows", "2", "--calib-window-len", "32", "--out", str(tmp_path / "q4"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["label"] == "int4-g32-fzero-dq-awq-gptq-head-int8"
    config = json.loads((tmp_path / "q4" / "quant_config.json").read_text())
    scheme = config["tensors"]["layers.0.ffn.down.weight"]["scheme"]
    assert scheme["zero_point"] == "float" and scheme["double_quant"] and scheme["group_size"] == 32
    assert config["tensors"]["lm_head.weight"]["scheme"]["bits"] == 8


def test_preset_q3_budget_counts_the_head(tmp_path: Path, tiny_llama_dir: Path, sample_text_file: Path) -> None:
    # the tiny model's int8 head is most of its weights: q3's 5.44 bits per weight cannot hold it
    r = _run("quantize", "--model", str(tiny_llama_dir), "--preset", "q3", "--calib", str(sample_text_file),
             "--calib-windows", "2", "--calib-window-len", "32", "--out", str(tmp_path / "q3"), "--threads", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["mlsyskit quantize: error: a bits-per-weight budget of 5.44 is below "
                                             "the cheapest mix (8.149); raise --budget or lower --bits"]
    assert not (tmp_path / "q3").exists()
