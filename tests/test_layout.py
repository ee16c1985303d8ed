"""The house rules: layered imports with no cycles, and a CLI that answers --help at once."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlsyskit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "fastapi", "uvicorn", "safetensors", "tokenizers", "gguf", "matplotlib", "pyspark", "grpc")


def _all_help_commands() -> list[list[str]]:
    """Every (sub)command path of the CLI, e.g. ["vector", "build"]."""
    out: list[list[str]] = [[]]

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append([*path, name])
                    walk(sub, [*path, name])

    walk(build_parser(), [])
    return out


def test_help_of_every_command_imports_nothing_heavy_and_is_fast() -> None:
    """In a fresh interpreter: --help of every command, then which heavy modules got imported,
    and the import time of mlsyskit.cli from -X importtime (its own clock, not wall time)."""
    commands = _all_help_commands()
    assert len(commands) > 8 and ["vector", "build"] in commands
    script = (
        "import contextlib, io, json, sys\n"
        "import mlsyskit.cli as cli\n"
        f"for argv in {commands!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: cli.main([*argv, '--help'])\n"
        "        except SystemExit as e: assert e.code == 0, (argv, e.code)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    cumulative_us = [int(line.split("|")[1]) for line in proc.stderr.splitlines() if line.rstrip().endswith("| mlsyskit.cli")]
    assert cumulative_us and cumulative_us[0] < 300_000, f"importing mlsyskit.cli took {cumulative_us} us"


def test_import_contracts_hold() -> None:
    """import-linter's contracts in pyproject.toml (layers, no cycles) are kept."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed: `pip install -e '.[test]'` provides it")
    proc = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout
