"""llama.cpp's own quantizer (``llama_model_quantize`` through ``llama-cpp-python``): the peer
our quantizers are measured against. Optional: ``pip install llama-cpp-python`` (``make
bench-deps``); without it these functions raise UserError."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError

# llama.cpp file types (llama_ftype) by the names its `llama-quantize` tool takes
FTYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K")


def llama_cpp() -> Any:
    """The ``llama_cpp`` module, or a UserError saying how to install it."""
    try:
        import llama_cpp as lc
    except ImportError:
        raise UserError("llama-cpp-python is not installed (pip install llama-cpp-python, or make bench-deps)") from None
    return lc


def quantize(src: str | Path, out: str | Path, ftype: str, threads: int = 1) -> Path:
    """Quantize the GGUF file ``src`` (F32/F16) to ``out`` with llama.cpp's ``ftype`` mix
    (e.g. "Q4_K_M": its choice of per-tensor types; rows whose width is not a multiple of 256
    fall back to Q5_0/Q5_1/Q8_0 as llama.cpp decides)."""
    lc = llama_cpp()
    if ftype not in FTYPES:
        raise UserError(f"unknown llama.cpp type {ftype!r}; choose one of {', '.join(FTYPES)}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    out = Path(out)
    rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise UserError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return out
