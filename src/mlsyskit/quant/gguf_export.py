"""`mlsyskit export-gguf`: any model the engine loads, written as a GGUF file llama.cpp reads.

``dtype``:

- ``"f32"`` / ``"f16"``: every weight as float (quantized weights dequantized): the float
  reference llama.cpp's own quantizer starts from (``llama_model_quantize``);
- ``"native"``: weights stay quantized where llama.cpp has a block format with the same
  meaning (:func:`to_blocks`); the others are written as F32. A GGUF source keeps its own
  tensors byte for byte.

Our quantized weights in llama.cpp's block formats (blocks of 32 inputs, so the group size must
be a multiple of 32; a group of 96 is three blocks with the same scale):

- 8-bit symmetric (``S q``)   -> Q8_0 (``d q``): exact (float16 scales);
- 4-bit symmetric (``S q``)   -> Q4_0 (``d (n - 8)``, n = q + 8): exact;
- 4-bit asymmetric (``S (q - Z)``) -> Q4_1 (``d n + m``, m = -S Z rounded to float16): the
  codes and scales exact, the minimum within float16 rounding (relative 2^-11).

8-bit asymmetric and 3/2-bit codes have no llama.cpp counterpart and are written as F32.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from mlsyskit.errors import UserError
from mlsyskit.models.gguf_export import RawBlocks, write_gguf
from mlsyskit.quant.tensor import QuantizedTensor

Q = GGMLQuantizationType
DTYPES = ("f32", "f16", "native")
BLOCK = 32


def to_blocks(qt: QuantizedTensor) -> RawBlocks | None:
    """``qt`` in the llama.cpp block format with the same values (see the module docstring),
    or None when there is none (asymmetric 8-bit, 3/2-bit, bfloat16 scales, a group size that
    is not a multiple of 32)."""
    s = qt.scheme
    rows, cols = qt.shape
    group = cols if s.granularity != "group" else s.group_size
    if s.scale_dtype != "float16" or cols % BLOCK or group % BLOCK:
        return None
    if s.bits == 8 and s.symmetric:
        qtype = Q.Q8_0
    elif s.bits == 4:
        qtype = Q.Q4_0 if s.symmetric else Q.Q4_1
    else:
        return None
    nb = cols // BLOCK
    # one scale (and zero) per block of 32: a group's repeated over its blocks
    d = qt.scale.float().expand(rows, qt.scale.shape[1]).repeat_interleave(nb // qt.scale.shape[1], 1)
    d16 = d.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    codes = qt.codes.numpy().reshape(rows, nb, BLOCK)
    if qtype == Q.Q8_0:
        body = codes.astype(np.int8).view(np.uint8)
        return RawBlocks(qtype, np.concatenate([d16, body], axis=2).reshape(rows, -1), cols)
    n = (codes.astype(np.int16) + (8 if s.symmetric else 0)).astype(np.uint8)
    nibbles = n[..., :16] | (n[..., 16:] << 4)  # GGUF: element j low nibble, j + 16 high
    parts = [d16]
    if qtype == Q.Q4_1:
        z = qt.zero.float().expand(rows, qt.scale.shape[1]).repeat_interleave(nb // qt.scale.shape[1], 1)
        parts.append((-d * z).numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8))
    return RawBlocks(qtype, np.concatenate([*parts, nibbles], axis=2).reshape(rows, -1), cols)


def _float(v: Any) -> Any:
    return v.dequantize() if isinstance(v, QuantizedTensor) else v


def export_gguf(
    model: str | Path | None, out: str | Path, dtype: str = "f32", *, overwrite: bool = False
) -> dict[str, Any]:
    """Load ``model`` (any checkpoint ``load_checkpoint`` reads; None: the embedded default)
    and write it to ``out`` as GGUF with ``dtype`` (see the module docstring). Returns a
    JSON-able summary: the file, its size and the tensor types written."""
    from mlsyskit.models.checkpoint import load_checkpoint
    from mlsyskit.models.gguf_loader import GGUFFile

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.is_dir():
        raise UserError(f"{out} is a directory; --out is the .gguf file to write")
    t0 = time.perf_counter()
    import mlsyskit.quant.model_io  # noqa: F401 - registers the quantized-directory loader

    ckpt = load_checkpoint(model)
    source = ckpt.source if Path(ckpt.source).is_file() else None
    kw: dict[str, Any] = {"source": source, "name": Path(ckpt.source).stem}
    types: dict[str, int] = {}
    if dtype == "native" and source is not None:  # a GGUF file: its own tensors, as they are
        tensors: dict[str, Any] = {}
        for t in GGUFFile(Path(source)).tensors:
            shape = tuple(reversed(t.shape))
            if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
                from mlsyskit.models.gguf_loader import dequantize

                tensors[t.name] = dequantize(t.data, t.tensor_type, shape).numpy()
            else:
                tensors[t.name] = RawBlocks(t.tensor_type, t.data.reshape(shape[0], -1), shape[-1])
        path = write_gguf(out, ckpt.config, tensors, ckpt.tokenizer, gguf_named=True,
                          file_type=_file_type(ckpt.file_type), **kw)
    else:
        tensors = {}
        for k, v in ckpt.state_dict.items():
            blocks = to_blocks(v) if dtype == "native" and isinstance(v, QuantizedTensor) else None
            tensors[k] = blocks if blocks is not None else _float(v)
        if ckpt.config.tie_embeddings and "lm_head.weight" in tensors:
            # a quantized copy of the tied embedding: llama.cpp takes it as its own output tensor
            ckpt.config.tie_embeddings = False
        float_type = "f16" if dtype == "f16" else "f32"
        path = write_gguf(out, ckpt.config, tensors, ckpt.tokenizer, float_type=float_type,
                          file_type=_native_file_type(tensors) if dtype == "native" else None, **kw)
    for t in GGUFFile(path).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "out": str(path),
        "dtype": dtype,
        "source": ckpt.source,
        "file_bytes": path.stat().st_size,
        "tensor_types": dict(sorted(types.items())),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _file_type(name: str) -> LlamaFileType | None:
    try:
        return LlamaFileType[f"MOSTLY_{name}"]
    except KeyError:
        return None


def _native_file_type(tensors: dict[str, Any]) -> LlamaFileType:
    """llama.cpp's file type: that of the most common block format (F32 when none)."""
    kinds = [v.qtype.name for v in tensors.values() if isinstance(v, RawBlocks)]
    if not kinds:
        return LlamaFileType.ALL_F32
    return LlamaFileType[f"MOSTLY_{max(set(kinds), key=kinds.count)}"]

