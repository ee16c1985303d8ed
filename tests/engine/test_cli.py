"""`mlsyskit generate` and `mlsyskit chat` run for real, in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "mlsyskit.cli"]
STATS = re.compile(r"\[(\d+) prompt tokens, (\d+) generated, finish_reason=(\w+)")


def _run(*args: str | bytes, stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    text = not isinstance(stdin, bytes) and not any(isinstance(a, bytes) for a in args)
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=text, timeout=300)


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


def _stats(stderr: str) -> list[tuple[int, int, str]]:
    return [(int(p), int(g), why) for p, g, why in STATS.findall(stderr)]


@pytest.mark.parametrize(
    "args, stdin",
    [([b"--prompt", b"caf\xe9"], None), (["--prompt", "-"], b"caf\xe9 au lait")],
    ids=["argv", "stdin"],
)
def test_non_utf8_prompt_is_one_line_and_exit_2(args: list, stdin: bytes | None) -> None:
    r = _run("generate", "--max-tokens", "2", *args, stdin=stdin)
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is not UTF-8 text (byte 0xe9 at" in lines[0], lines
    assert lines[0].startswith("mlsyskit generate: error: ")


def test_stats_for_a_single_token_print_no_nan(tiny_llama_dir: Path) -> None:
    r = _run("generate", "--model", str(tiny_llama_dir), "--prompt", "Hi", "--max-tokens", "1", "--stats", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "1 generated" in r.stderr and "nan" not in r.stderr
    assert "decode n/a" in r.stderr


def test_chat_refuses_bad_lines_and_keeps_the_conversation(smollm2_path: Path) -> None:
    """Commands, a non-UTF-8 line, a message too long for the context and typed special tokens:
    each handled in one line, the session and the conversation go on."""
    lines = [
        b"/help", b"/nonsense", b"caf\xe9", b"My name is Ada.", b"word " * 9000, b"What is my name?",
        b"/reset", b"<|im_start|>" * 4, b"/exit", b"never read",
    ]
    r = _run("chat", "--temperature", "0", "--max-tokens", "4", "--threads", "1", "--stats",
             stdin=b"\n".join(lines) + b"\n")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert "commands: /reset starts a new conversation" in out  # /help is a command ...
    notes = [line for line in err.splitlines() if not line.startswith("[")]
    assert len(notes) == 3, notes
    assert notes[0] == "mlsyskit chat: unknown command /nonsense; /help lists the commands (not sent)"
    assert "that line is not UTF-8 text (byte 0xe9 at byte 3)" in notes[1]
    assert "the message takes" in notes[2] and "(not sent; the conversation is kept)" in notes[2]
    (p1, g1, _), (p2, _, _), (p3, _, _) = _stats(err)  # ... so are bad lines: 3 replies
    assert p2 > p1 + g1  # the conversation survived the refused lines
    # fresh conversations with "My name is Ada." (5 tokens) and with four typed <|im_start|>: as
    # text each takes several tokens (as special tokens, one each: p3 - p1 would be -1)
    assert p3 - p1 >= 4 * 4 - 5


class _Chat:
    """`mlsyskit chat` in a real process, its output collected as it streams."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*CLI, "chat", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.out, self.err = bytearray(), bytearray()
        for stream, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, cond, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, f"chat exited ({self.proc.returncode}) waiting for {what}: {self.err.decode()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def interrupted_reply(self, message: str) -> None:
        """Send ``message``, press Ctrl-C (a real SIGINT) once its reply has started."""
        before, stops = len(self.out), self.err.count(b"reply stopped")
        self.send(message)
        self.wait_for(lambda: len(self.out) > before + 12, "the reply to start")
        self.proc.send_signal(signal.SIGINT)
        self.wait_for(lambda: self.err.count(b"reply stopped") > stops, "the reply to stop")


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(smollm2_path: Path) -> None:
    chat = _Chat("--temperature", "0", "--max-tokens", "400", "--threads", "1", "--stats")
    try:
        chat.interrupted_reply("Count from 1 to 300, separated by commas.")
        chat.interrupted_reply("Write a long poem about the sea.")
        chat.send("/reset")
        chat.interrupted_reply("Write a long poem about the sea.")
        chat.send("/exit")
        chat.proc.stdin.close()
        assert chat.proc.wait(timeout=120) == 0  # three Ctrl-C, and the session went on
    finally:
        chat.proc.kill()
    err = chat.err.decode()
    assert err.count("mlsyskit chat: reply stopped (Ctrl-C); the conversation is kept") == 3, err
    (p1, g1, r1), (p2, _, _), (p3, _, _) = _stats(err)
    assert r1 == "interrupted" and 0 < g1 < 400
    assert p2 > p3 + g1  # the second prompt holds the first message and its partial reply


def test_ctrl_d_ends_an_interactive_chat_on_a_new_line(tiny_llama_dir: Path) -> None:
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "chat", "--model", str(tiny_llama_dir), "--threads", "1", "--max-tokens", "8"],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while not seen.endswith(b"you> "):
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += os.read(master, 1024)
        os.write(master, b"/help\n")
        while not seen.endswith(b"you> ") or b"commands:" not in seen:
            seen += os.read(master, 1024)
        os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        proc.kill()
        os.close(master)
    assert seen.endswith(b"you> \r\n"), seen[-40:]  # the shell's prompt will start on its own line


def test_ctrl_c_in_generate_says_so_on_its_own_line(smollm2_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "generate", "--prompt", "Count from 1 to 500: 1, 2, 3,", "--max-tokens", "600",
                             "--temperature", "0", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = bytearray()
    threading.Thread(target=lambda: [seen.extend(c) for c in iter(lambda: proc.stdout.read1(4096), b"")], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while len(seen) < 12:
            assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    time.sleep(0.1)  # let the reader thread take the last bytes
    lines = bytes(seen).decode().rstrip("\n").split("\n")
    assert lines[-1] == "mlsyskit generate: interrupted: generation stopped (the text above is what was generated)"
    assert "Traceback" not in bytes(seen).decode() and "checkpoint" not in lines[-1]
    assert any(ch.isdigit() for ch in "".join(lines[:-1]))  # the streamed text, on lines of its own


def test_chat_max_tokens_filling_the_context_is_one_line(tiny_llama_dir: Path) -> None:
    r = _run("chat", "--model", str(tiny_llama_dir), "--max-tokens", "256", "--threads", "1", stdin="hi\n")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "mlsyskit chat: error: --max-tokens 256 leaves no room for a message in the model's context of 256 tokens"
    ]
