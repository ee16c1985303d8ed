"""`mlsyskit generate` and `mlsyskit chat` (placeholder)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the engine subcommands to the top-level parser."""
