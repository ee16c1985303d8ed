"""Quantized checkpoint format: a directory with ``model.safetensors`` + ``quant_config.json``.

For each quantized tensor ``name`` (a ``QuantizedTensor`` with shape (out, in) and scheme of
``bits`` bits) ``model.safetensors`` holds:

- ``name.qweight``: uint8, 1-D, the row-major codes bit-packed with ``bits`` bits
  (``mlsyskit.quant.packing``); symmetric (signed) codes are stored offset by ``2^(bits-1)``;
- ``name.scale``: the scales in ``scheme.scale_dtype``, shape (1, 1), (out, 1) or
  (out, n_groups);
- ``name.zero``: asymmetric only: the integer zero points (row-major, shaped like the scale)
  bit-packed with ``bits`` bits;
- ``name.min``: float zero points only: the group minimums in ``scheme.scale_dtype``;
- double-quantized scales (``scheme.double_quant``): instead of ``name.scale``,
  ``name.scale_q`` (6-bit codes, packed) and ``name.scale_d`` (one ``scale_dtype`` value per
  super-block of a row), and likewise ``name.min_q`` / ``name.min_d`` for float minimums.

Plain tensors are stored under their own name, unchanged. ``quant_config.json`` reads
``{"format": "mlsyskit-quant", "version": 1, "tensors": {name: {"shape": [out, in],
"scheme": QuantScheme.to_dict()}}, **meta}``. The ``"tensors"`` part is also kept in the
safetensors metadata, so a config that does not belong to the weights (e.g. a save interrupted
between the two files) is detected on load. Each file is written atomically (temp + rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsyskit.errors import UserError
from mlsyskit.quant.packing import pack, unpack
from mlsyskit.quant.scheme import DQ_BITS, QuantScheme
from mlsyskit.quant.tensor import SCALE_DTYPES, QuantizedTensor

FORMAT = "mlsyskit-quant"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "quant_config.json"
_RESERVED = ("format", "version", "tensors")
_SUFFIXES = (".qweight", ".scale", ".zero", ".min", ".scale_q", ".scale_d", ".min_q", ".min_d")


def save_quantized(
    path: str | Path, tensors: dict[str, Tensor | QuantizedTensor], meta: dict[str, Any]
) -> None:
    """Write ``tensors`` (quantized or plain) and JSON-able ``meta`` to the directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if not isinstance(meta, dict) or any(k in meta for k in _RESERVED):
        raise UserError(f"meta must be a dict without the reserved keys {list(_RESERVED)}")
    entries: dict[str, dict[str, Any]] = {}
    flat: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, QuantizedTensor):
            entries[name] = {"shape": list(t.shape), "scheme": t.scheme.to_dict()}
            parts = _encode(name, t)
        elif isinstance(t, Tensor):
            parts = {name: t.detach().cpu().contiguous().clone()}  # clone: no shared storage
        else:
            raise UserError(f"{name!r} is a {type(t).__name__}, not a tensor")
        for key, value in parts.items():
            if key in flat:
                raise UserError(f"two tensors would be stored under the name {key!r}")
            flat[key] = value
    config = {"format": FORMAT, "version": VERSION, "tensors": entries, **meta}
    try:
        text = json.dumps(config, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise UserError(f"meta is not JSON-serializable: {e}") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        st_meta = {"format": FORMAT, "tensors": json.dumps(entries, sort_keys=True)}
        _atomic_write(path / WEIGHTS, lambda p: save_file(flat, str(p), metadata=st_meta))
        _atomic_write(path / CONFIG, lambda p: p.write_text(text))
    except OSError as e:
        raise UserError(f"cannot write the quantized checkpoint {path}: {e}") from None


def load_quantized(path: str | Path) -> tuple[dict[str, Tensor | QuantizedTensor], dict[str, Any]]:
    """(tensors, meta) of a ``save_quantized`` directory, bit-exact.

    Raises UserError for a missing directory or file, a corrupt file, or files that do not
    match each other.
    """
    from safetensors import safe_open

    path = Path(path)
    config = _read_config(path)
    entries = config["tensors"]
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path / WEIGHTS} is missing")
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            st_meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any corruption becomes one clear line
        raise UserError(f"{path / WEIGHTS} is unreadable ({e})") from None
    if st_meta.get("format") != FORMAT or st_meta.get("tensors") != json.dumps(
        entries, sort_keys=True
    ):
        raise UserError(f"{path / CONFIG} does not match {path / WEIGHTS}; save the model again")
    out: dict[str, Tensor | QuantizedTensor] = {}
    for name, entry in entries.items():
        try:
            out[name] = _decode(name, entry, flat)
        except (KeyError, TypeError, ValueError, AttributeError, UserError) as e:
            raise UserError(f"quantized tensor {name!r} in {path} is corrupt ({e})") from None
    owned = {name + s for name in entries for s in _SUFFIXES}
    out.update({k: v for k, v in flat.items() if k not in owned})
    meta = {k: v for k, v in config.items() if k not in _RESERVED}
    return out, meta


def storage_bytes(path: str | Path) -> int:
    """Total size in bytes of the files in the directory ``path`` (not recursive)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _encode(name: str, qt: QuantizedTensor) -> dict[str, Tensor]:
    """The stored tensors of one QuantizedTensor; refuses anything that would not be bit-exact."""
    s = qt.scheme
    out, inf = qt.shape
    scale_shape = (1, 1) if s.granularity == "tensor" else (out, s.n_groups(inf))
    want_dtype = torch.int8 if s.symmetric else torch.uint8
    if qt.codes.dim() != 2 or qt.codes.dtype != want_dtype:
        raise UserError(f"{name!r}: codes must be 2-D {want_dtype}, got {qt.codes.dtype}")
    if tuple(qt.scale.shape) != scale_shape:
        raise UserError(f"{name!r}: scale shape {tuple(qt.scale.shape)} != {scale_shape}")
    floatzero = s.zero_point == "float"
    if (qt.zero is None) != (s.symmetric or floatzero) or (qt.minimum is None) == floatzero:
        raise UserError(f"{name!r}: zero points (or float minimums) must match the scheme")
    parts: dict[str, Tensor] = {}
    if s.double_quant:
        parts.update(_encode_dq(name, "scale", qt.scale, s))
        if floatzero:
            parts.update(_encode_dq(name, "min", -qt.minimum, s))
    else:
        parts[f"{name}.scale"] = _exact(name, "scales", qt.scale, s)
        if floatzero:
            parts[f"{name}.min"] = _exact(name, "minimums", qt.minimum, s)
    codes = qt.codes.detach().cpu().to(torch.int16)
    if codes.numel() and (int(codes.min()) < s.qmin or int(codes.max()) > s.qmax):
        raise UserError(f"{name!r}: codes outside [{s.qmin}, {s.qmax}]")
    offset = 0 if not s.symmetric else 2 ** (s.bits - 1)
    parts[f"{name}.qweight"] = pack(codes + offset, s.bits)
    if qt.zero is not None:
        zero = qt.zero.detach().cpu().float()
        if tuple(zero.shape) != scale_shape or not torch.equal(zero, zero.round()):
            raise UserError(f"{name!r}: zero points must be integers shaped like the scale")
        if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > s.qmax):
            raise UserError(f"{name!r}: zero points outside [0, {s.qmax}]")
        parts[f"{name}.zero"] = pack(zero.to(torch.int16), s.bits)
    return parts


def _exact(name: str, what: str, v: Tensor, s: QuantScheme) -> Tensor:
    stored = v.detach().cpu().to(SCALE_DTYPES[s.scale_dtype])
    if not torch.equal(stored.float(), v.detach().cpu().float()):
        raise UserError(f"{name!r}: {what} are not exactly representable in {s.scale_dtype}")
    return stored.contiguous()


def _encode_dq(name: str, kind: str, v: Tensor, s: QuantScheme) -> dict[str, Tensor]:
    """``v`` (rows, groups) = ``d * c`` as 6-bit codes and per-super-block scales (exactly,
    else UserError): ``d`` is a super-block's largest value / 63 (see ``double_quantize``)."""
    v = v.detach().cpu().float()
    rows, g = v.shape
    sg = s.super_groups
    nsb = -(-g // sg)
    vp = torch.nn.functional.pad(v, (0, nsb * sg - g)).view(rows, nsb, sg)
    d = vp.amax(-1, keepdim=True) / 63
    d = torch.where(d > 0, d, torch.ones_like(d))
    c = vp / d
    if not torch.equal(c, c.round()) or float(c.min()) < 0 or float(c.max()) > 63 or not torch.equal(d * c, vp):
        raise UserError(f"{name!r}: {kind}s are not double-quantized 6-bit codes")
    codes = c.view(rows, nsb * sg)[:, :g].to(torch.int16)
    return {f"{name}.{kind}_q": pack(codes, DQ_BITS), f"{name}.{kind}_d": _exact(name, kind + " scales", d.view(rows, nsb), s)}


def _decode_dq(name: str, kind: str, flat: dict[str, Tensor], s: QuantScheme, shape: tuple[int, int]) -> Tensor:
    rows, g = shape
    sg = s.super_groups
    nsb = -(-g // sg)
    d = flat[f"{name}.{kind}_d"]
    if d.dtype != SCALE_DTYPES[s.scale_dtype] or tuple(d.shape) != (rows, nsb):
        raise ValueError(f"{kind}_d is {d.dtype} {tuple(d.shape)}, expected {(rows, nsb)}")
    c = unpack(flat[f"{name}.{kind}_q"], DQ_BITS, rows * g).view(rows, g).float()
    c = torch.nn.functional.pad(c, (0, nsb * sg - g)).view(rows, nsb, sg)
    return (d.float().unsqueeze(-1) * c).view(rows, nsb * sg)[:, :g].contiguous()


def _decode(name: str, entry: dict[str, Any], flat: dict[str, Tensor]) -> QuantizedTensor:
    s = QuantScheme.from_dict(entry["scheme"])
    out, inf = (int(d) for d in entry["shape"])
    scale_shape = (1, 1) if s.granularity == "tensor" else (out, s.n_groups(inf))
    floatzero = s.zero_point == "float"
    minimum = None
    if s.double_quant:
        scale = _decode_dq(name, "scale", flat, s, scale_shape)
        if floatzero:
            minimum = -_decode_dq(name, "min", flat, s, scale_shape)
    else:
        scale = flat[f"{name}.scale"]
        if scale.dtype != SCALE_DTYPES[s.scale_dtype] or tuple(scale.shape) != scale_shape:
            raise ValueError(f"scale is {scale.dtype} {tuple(scale.shape)}, expected {scale_shape}")
        scale = scale.float()
        if floatzero:
            minimum = flat[f"{name}.min"]
            if minimum.dtype != SCALE_DTYPES[s.scale_dtype] or tuple(minimum.shape) != scale_shape:
                raise ValueError(f"min is {minimum.dtype} {tuple(minimum.shape)}, expected {scale_shape}")
            minimum = minimum.float()
    codes = unpack(flat[f"{name}.qweight"], s.bits, out * inf).view(out, inf)
    zero = None
    if s.symmetric:
        codes = (codes.to(torch.int16) - 2 ** (s.bits - 1)).to(torch.int8)
    elif not floatzero:
        n = scale_shape[0] * scale_shape[1]
        zero = unpack(flat[f"{name}.zero"], s.bits, n).view(scale_shape).float()
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, scheme=s, minimum=minimum)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise UserError(f"no quantized checkpoint at {path} (not a directory)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise UserError(f"{path / CONFIG} is missing; is {path} a quantized checkpoint?") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path / CONFIG} is unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path / CONFIG} is not a {FORMAT} config")
    if config.get("version") != VERSION:
        raise UserError(
            f"{path / CONFIG} has format version {config.get('version')!r}; "
            f"this mlsyskit reads version {VERSION}"
        )
    if not isinstance(config.get("tensors"), dict):
        raise UserError(f"{path / CONFIG} has no 'tensors' table")
    return config


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
