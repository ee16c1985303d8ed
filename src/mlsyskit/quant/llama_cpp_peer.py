"""llama.cpp as the peer: its own quantizer (``llama_model_quantize`` through
``llama-cpp-python``) that our quantizers are measured against, its own perplexity that our
scorer is checked against, and how its CPU matmuls round activations. Optional: ``pip install
llama-cpp-python`` (``make bench-deps``); without it :func:`quantize` and :func:`perplexity`
raise UserError."""

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


def quantize(src: str | Path, out: str | Path, ftype: str, threads: int = 1, requantize: bool = False) -> Path:
    """Quantize the GGUF file ``src`` (F32/F16) to ``out`` with llama.cpp's ``ftype`` mix
    (e.g. "Q4_K_M": its choice of per-tensor types; rows whose width is not a multiple of 256
    fall back to Q5_0/Q5_1/Q8_0 as llama.cpp decides). ``requantize``: ``src`` may be quantized
    already (llama.cpp dequantizes it to float32 first: the same file as from its F32 export)."""
    lc = llama_cpp()
    if ftype not in FTYPES:
        raise UserError(f"unknown llama.cpp type {ftype!r}; choose one of {', '.join(FTYPES)}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.allow_requantize = requantize
    out = Path(out)
    rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise UserError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return out


def perplexity(path: str | Path, text: str, window: int = 256, max_tokens: int | None = None,
               threads: int = 1) -> tuple[float, list[int]]:
    """llama.cpp's own perplexity of the GGUF file ``path`` on ``text`` (tokenized by llama.cpp,
    cut to ``max_tokens``), and the token ids: non-overlapping windows of ``window`` tokens, each
    evaluated from position 0, all but its first token scored, as ``mlsyskit perplexity
    --window`` scores them when the token count is a multiple of the window. Float32 KV cache
    (llama.cpp's default is float16), so only the weights' products differ from ours."""
    import numpy as np

    lc = llama_cpp()
    llm = lc.Llama(model_path=str(path), n_ctx=window, logits_all=True, verbose=False, n_threads=threads,
                   n_batch=window, type_k=0, type_v=0)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:max_tokens]
        total, n = 0.0, 0
        for b in range(0, len(ids), window):
            w = ids[b : b + window]
            if len(w) < 2:
                continue
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
            n += len(w) - 1
    finally:
        llm.close()
    if n == 0:
        raise UserError("perplexity needs at least 2 tokens of text")
    return float(np.exp(total / n)), ids


def round_activations(x: Any, qtype: str) -> Any:
    """``x`` (..., K) float32 as llama.cpp's CPU matmuls see it against weights stored in block
    format ``qtype``: rounded to the format's dot-product type (ggml's ``vec_dot_type``).

    - K-quants (Q2_K..Q6_K): Q8_K, per 256 values: ``q = round(-127 x / max)`` (``max`` the
      value of largest magnitude, sign kept), at most 127, times the float32 ``1 / (-127 / max)``;
    - Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: Q8_0 / Q8_1, per 32: ``q = round(x * 127 / max|x|)`` times
      ``d = max|x| / 127`` stored as float16.

    Rounding half to even, as ggml's ``nearest_int`` and ``_mm256_round_ps`` do. Our kernels round
    per 32 with a float32 ``d`` (:func:`mlsyskit.quant.kernels.fake_quantize_activations`) and
    the dense path does not round at all; this is for comparing scores with llama.cpp's."""
    import torch

    k_quant = qtype.endswith("_K")
    xb = x.float().reshape(*x.shape[:-1], -1, 256 if k_quant else 32)
    if k_quant:
        big = torch.gather(xb, -1, xb.abs().argmax(-1, keepdim=True))
        iscale = torch.where(big != 0, -127.0 / torch.where(big != 0, big, 1.0), 0.0)
        q = torch.clamp(torch.round(iscale * xb), max=127)
        d = torch.where(iscale != 0, 1.0 / torch.where(iscale != 0, iscale, 1.0), 0.0)
    else:
        amax = xb.abs().amax(-1, keepdim=True)
        q = torch.round(xb * torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0))
        d = (amax / 127.0).half().float()
    return (q * d).reshape(x.shape)
