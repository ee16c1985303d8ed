"""`mlsyskit generate` and `mlsyskit chat` run for real, in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlsyskit.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )


def test_generate_streams_the_greedy_continuation(smollm2_path: Path) -> None:
    r = _run("generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--temperature", "0", "--stats", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "6 generated, finish_reason=length" in r.stderr


def test_chat_keeps_the_conversation(smollm2_path: Path) -> None:
    r = _run("chat", "--temperature", "0", "--max-tokens", "16", "--threads", "1", "--stats",
             stdin="My name is Ada.\n\nWhat is my name?\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2  # two replies; the empty line is skipped and /exit stops
    (p1, g1), (p2, _) = [tuple(int(w) for w in re.findall(r"(\d+) (?:prompt tokens|generated)", s)) for s in stats]
    assert p2 > p1 + g1  # the second prompt holds the first exchange


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, gpt2: ["--model", str(tmp / "missing.gguf")], "does not exist"),
        (lambda tmp, gpt2: ["--model", str(_garbage(tmp))], "gguf"),
        (lambda tmp, gpt2: ["--model", str(gpt2), "--prompt", "word " * 80], "context holds 64"),
        (lambda tmp, gpt2: ["--model", str(gpt2), "--top-p", "2"], "top_p"),
    ],
    ids=["missing", "corrupt", "too-long", "bad-top-p"],
)
def test_bad_input_is_one_line_and_exit_2(make_args, message: str, tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    args = make_args(tmp_path, tiny_gpt2_dir)
    if "--prompt" not in args:
        args += ["--prompt", "hello"]
    r = _run("generate", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0].lower() or message in lines[0], lines


def _garbage(tmp: Path) -> Path:
    p = tmp / "broken.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    return p
