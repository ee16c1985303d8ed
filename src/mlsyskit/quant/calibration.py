"""Calibration data for activation-aware quantization: token windows and input statistics.

- :func:`calibration_windows` cuts random fixed-length windows out of a tokenized text;
- :func:`default_calibration_text` is a text every Python install has (no download);
- :func:`input_abs_mean` runs the model on windows and records, with forward hooks, the mean
  ``|x|`` of every input channel of each ``nn.Linear`` (AWQ's activation statistic ``s_X``);
- :func:`recorded_inputs` and :func:`embed_inputs` are the pieces AWQ and the diagnostics use to
  run a model block by block and look at what each linear layer receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError

if TYPE_CHECKING:
    from mlsyskit.models.blocks import Rope
    from mlsyskit.models.tokenizer import Tokenizer
    from mlsyskit.models.transformer import Transformer


def calibration_windows(
    tokenizer: Tokenizer, text: str, n_windows: int = 32, window: int = 256, seed: int = 0
) -> Tensor:
    """``n_windows`` windows of ``window`` consecutive token ids of ``text``, shape (n, window).

    The text is tokenized whole (no BOS) and each window starts at a uniformly random offset
    (a ``torch.Generator`` seeded with ``seed``: the same arguments give the same windows);
    windows may overlap. Raises UserError when the text has fewer than ``window`` tokens.
    """
    if not isinstance(n_windows, int) or n_windows < 1:
        raise UserError(f"the number of calibration windows must be at least 1, got {n_windows!r}")
    if not isinstance(window, int) or window < 1:
        raise UserError(f"the calibration window length must be at least 1, got {window!r}")
    ids = torch.tensor(tokenizer.encode(text, add_bos=False), dtype=torch.long)
    if ids.numel() < window:
        raise UserError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of {window}: "
            "give a longer text or a shorter window"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - window + 1, (n_windows,), generator=gen)
    return torch.stack([ids[s : s + window] for s in starts.tolist()])


def default_calibration_text() -> str:
    """Python's own documentation topics: the pages ``help("assert")``, ``help("if")``, ...
    show, from ``pydoc_data.topics`` (part of the standard library), joined in sorted order.

    About 465k characters of English prose with code (about 113k SmolLM2 tokens), identical on
    every machine with the same Python version and needing no download.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it from minimal Python installs
        raise UserError(
            "this Python has no pydoc_data (the default calibration text): pass a text file "
            "with --calib"
        ) from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def embed_inputs(model: Transformer, ids: Tensor) -> tuple[Tensor, Rope | None]:
    """The input of the first block for token windows ``ids`` (B, T) and the RoPE tables for
    positions ``0..T-1`` (None for GPT-2), exactly as ``Transformer.forward`` computes them."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise UserError("calibration ids must be a (windows, tokens) tensor of int64 token ids")
    T = ids.shape[1]
    model._check_len(T)
    pos = torch.arange(T, device=ids.device)
    with torch.no_grad():
        x = model._embed(ids, pos)
    rope = None if model.cfg.gpt2 else (model.rope_cos[:T], model.rope_sin[:T])
    return x, rope


@contextmanager
def recorded_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """While open, every call of ``modules[name]`` appends its input, flattened to
    (tokens, features) and detached, to the yielded ``{name: [tensor, ...]}``."""
    records: dict[str, list[Tensor]] = {name: [] for name in modules}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach()
            records[name].append(x.reshape(-1, x.shape[-1]).float())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def input_abs_mean(
    model: nn.Module, ids: Tensor, module_names: list[str] | None = None, batch_size: int = 4
) -> dict[str, Tensor]:
    """Per-input-channel mean ``|x|`` over all calibration tokens for each ``nn.Linear``:
    ``{name: (in_features,)}``. ``module_names`` restricts it to those layers (all by default).

    The model runs a plain forward on ``ids`` (windows, T), ``batch_size`` windows at a time
    (the logits of a whole calibration set would not fit); sums are kept, not the inputs.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if module_names is not None:
        unknown = [n for n in module_names if n not in linears]
        if unknown:
            raise UserError(f"no linear layer named {unknown[0]!r} in the model")
        linears = {n: linears[n] for n in module_names}
    sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float()
            sums[name] += x.abs().reshape(-1, x.shape[-1]).sum(0).cpu()
            counts[name] += x.numel() // x.shape[-1]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in linears}
