"""`mlsyskit quantize` and `mlsyskit perplexity` (placeholder)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the quantization subcommands to the top-level parser."""
