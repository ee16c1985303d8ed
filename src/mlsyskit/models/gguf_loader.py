"""Load a GGUF file (llama.cpp's format) into our config, state dict and tokenizer.

Reads the file memory-mapped (:class:`GGUFFile`), undoes llama.cpp's Q/K row permutation
and fuses q|k|v and gate|up into our layout (names: :mod:`mlsyskit.models.checkpoint`).
Architectures: llama (SmolLM2, TinyLlama, Mistral), qwen2, gpt2. Two ways:

- ``native=False`` (the float reference): F32/F16/BF16/Q8_0/Q4_0/Q4_1 are dequantized with the
  vectorized numpy code below, Q5_0/Q5_1 and the K-quants (Q2_K..Q6_K) with
  :mod:`mlsyskit.models.gguf_kquants`, fused tensors straight into their slice of the output.
- ``native=True``: every 2-D weight stored in a block format (Q4_0/Q4_1/Q8_0, Q5_0/Q5_1,
  Q2_K..Q6_K) stays in the file as it is: its state-dict value is a :class:`BlockWeight` (views
  of the memory-mapped blocks, the fused parts side by side, the Q/K permutation as an index of
  output rows). Nothing is dequantized or copied here, so loading takes a fraction of a second;
  the engine computes on the blocks with the kernels of :mod:`mlsyskit.quant.kernels`
  (``quantized_linear=`` of ``build_transformer``), Q4_0/Q4_1/Q8_0 in place, the others
  repacked by :mod:`mlsyskit.quant.gguf_repack`. F32/F16/BF16 weights load as float32.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint_types import Checkpoint, check_state_dict, check_tokenizer
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.gguf_kquants import DEQUANTIZERS
from mlsyskit.models.tokenizer import Tokenizer

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1) + tuple(Q[n] for n in DEQUANTIZERS)
SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2")
NATIVE_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0) + tuple(Q[n] for n in DEQUANTIZERS)  # kept as blocks with native=True
BLOCK = 32  # values per block of Q4_0/Q4_1/Q8_0/Q5_0/Q5_1 (K-quants: super-blocks of 256)


@dataclass(frozen=True)
class BlockTensor:
    """A GGUF tensor kept in its block format: ``data`` is a read-only ``(rows, row_bytes)``
    uint8 view of the memory-mapped file; ``perm`` (int32, or None) is the output row of each
    stored row (llama.cpp's Q/K row order, undone without moving a byte)."""

    qtype: str  # a NATIVE_TYPES name: "Q4_0", "Q8_0", "Q4_K", ...
    data: np.ndarray
    perm: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def block_values(self) -> int:
        """Values per block (32, or 256 for the K-quants)."""
        return GGML_QUANT_SIZES[Q[self.qtype]][0]

    @property
    def block_bytes(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[Q[self.qtype]][1]


@dataclass(frozen=True)
class BlockWeight:
    """One of our (out, in) weights made of GGUF block tensors stacked by rows (q|k|v, gate|up).

    Not a tensor: ``build_transformer(..., quantized_linear=...)`` turns it into a layer (e.g.
    ``mlsyskit.quant.linear.BlockLinear``); :meth:`dequantize` gives the float32 reference.
    """

    parts: tuple[BlockTensor, ...]
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(p.data.nbytes for p in self.parts)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, exactly as ``native=False`` loads it."""
        out = np.empty(self.shape, dtype=np.float32)
        start = 0
        for p in self.parts:
            rows = np.empty((p.rows, self.shape[1]), dtype=np.float32)
            dequantize_into(p.data, int(Q[p.qtype]), rows)
            if p.perm is None:
                out[start : start + p.rows] = rows
            else:
                out[start + p.perm] = rows
            start += p.rows
        return torch.from_numpy(out)

    def dequantize_rows(self, ids: np.ndarray) -> torch.Tensor:
        """Rows ``ids`` of a one-part weight in stored order (an embedding table), float32 as
        :meth:`dequantize` gives them."""
        if len(self.parts) != 1 or self.parts[0].perm is not None:
            raise ValueError("dequantize_rows takes a weight of one part, rows in order")
        p = self.parts[0]
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)
        dequantize_into(np.ascontiguousarray(p.data[ids]).reshape(-1), int(Q[p.qtype]), out)
        return torch.from_numpy(out)


# -- dequantization ---------------------------------------------------------------------------


def _u8(data: np.ndarray) -> np.ndarray:
    """The raw bytes of a tensor (``TensorInfo.data`` or gguf-py's arrays), flat uint8."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _f16(block_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) little-endian float16 bytes -> (n, 1) float32."""
    return np.ascontiguousarray(block_bytes).view("<f2").astype(np.float32)


# numpy rather than torch: single-threaded and memory-bound either way, and torch's threaded
# small ops slow down badly on a busy machine (numpy ~0.35 s for SmolLM2, torch 0.3-4 s).
def dequantize_into(raw: np.ndarray, qtype: int, out: np.ndarray) -> None:
    """Dequantize raw GGUF bytes ``raw`` (uint8) into the contiguous float32 array ``out``.

    Same fp32 operations in the same order as ``gguf.quants.dequantize``, so bit-identical.
    """
    qtype = Q(qtype)
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UserError(f"GGUF tensor type {qtype.name} is not supported (supported: {names})")
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if out.size % block or raw.size != out.size // block * nbytes:
        raise UserError(f"GGUF tensor has {raw.size} bytes, which does not fit {out.size} values")
    flat = out.reshape(-1)  # a view: out is contiguous
    if qtype in (Q.F32, Q.F16):
        flat[:] = raw.reshape(-1).view("<f4" if qtype == Q.F32 else "<f2")
    elif qtype == Q.BF16:  # the top half of a float32
        flat.view(np.uint32)[:] = raw.reshape(-1).view("<u2").astype(np.uint32) << 16
    else:
        blocks = raw.reshape(-1, nbytes)
        o = flat.reshape(-1, block)  # one row per block
        if qtype.name in DEQUANTIZERS:
            DEQUANTIZERS[qtype.name](blocks, o)
            return
        d = _f16(blocks[:, :2])
        if qtype == Q.Q8_0:  # d: f16, then 32 int8; value = q * d
            o[:] = blocks[:, 2:].view(np.int8)
            o *= d
            return
        qs = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]
        # byte j holds element j in its low nibble and element j + 16 in its high nibble
        np.bitwise_and(qs, 0x0F, out=o[:, :16], casting="unsafe")
        np.right_shift(qs, 4, out=o[:, 16:], casting="unsafe")
        if qtype == Q.Q4_0:  # d: f16, then 32 nibbles; value = d * (q - 8)
            o -= 8
            o *= d
        else:  # Q4_1: d, m: f16, then 32 nibbles; value = d * q + m
            o *= d
            o += _f16(blocks[:, 2:4])


def dequantize(data: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize one tensor's bytes (``TensorInfo.data``, or gguf-py's arrays) to float32.

    ``shape`` is in torch order (the reverse of GGUF's dimension list).
    """
    out = np.empty(shape, dtype=np.float32)
    dequantize_into(_u8(data), qtype, out)
    return torch.from_numpy(out)


# -- reading the file -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ``shape`` in GGUF order (fastest dimension first), ``data``
    its bytes, a read-only flat uint8 view of the memory-mapped file."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data: np.ndarray

    @property
    def n_bytes(self) -> int:
        return self.data.nbytes


# GGUF metadata value types (gguf.GGUFValueType): id -> numpy dtype; 7 bool, 8 string, 9 array
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


class GGUFFile:
    """A GGUF file (v2/v3, little-endian) memory-mapped: ``metadata`` (key -> Python value:
    str, int, float, bool, or a list of them) and ``tensors`` (:class:`TensorInfo`).

    Our own parser rather than ``gguf.GGUFReader``: that one builds Python objects for every
    element of every metadata array (a 49k-token vocabulary and its merges: ~0.5 s, several
    seconds on a busy machine); here strings are cut out of one bytes object in a loop and
    numeric arrays are single ``np.frombuffer`` calls.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.bytes = np.frombuffer(self._map, dtype=np.uint8)  # read-only view
        self._pos = 0
        if self._read(4) != b"GGUF":
            raise ValueError("bad magic number")
        version = self._scalar("<u4")
        if version & 0xFFFF == 0:
            raise _BigEndian
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader takes 2 and 3)")
        n_tensors, n_kv = self._scalar("<u8"), self._scalar("<u8")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<u4"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._scalar("<u8") for _ in range(self._scalar("<u4")))
            infos.append((name, dims, Q(self._scalar("<u4")), self._scalar("<u8")))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = []
        for name, dims, qtype, offset in infos:
            block, nbytes = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims, dtype=np.int64)) // block * nbytes
            lo = start + offset
            if lo + n > len(self.bytes):
                raise _Truncated(name)
            self.tensors.append(TensorInfo(name, dims, qtype, self.bytes[lo : lo + n]))

    def _read(self, n: int) -> bytes:
        if self._pos + n > len(self._map):
            raise ValueError("the file ends inside its metadata")
        out = self._map[self._pos : self._pos + n]
        self._pos += n
        return out

    def _scalar(self, dtype: str) -> Any:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self._read(size), dtype=dtype)[0].item()

    def _string(self) -> str:
        return self._read(self._scalar("<u8")).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._string()
        if vtype in _SCALARS:
            v = self._scalar(_SCALARS[vtype])
            return bool(v) if vtype == 7 else v
        if vtype != 9:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._scalar("<u4"), self._scalar("<u8")
        if etype == 8:  # strings: (u64 length, bytes) each
            raw, pos, out = self._map, self._pos, []
            for _ in range(count):
                n = int.from_bytes(raw[pos : pos + 8], "little")
                out.append(raw[pos + 8 : pos + 8 + n].decode("utf-8"))
                pos += 8 + n
            if pos > len(raw):
                raise ValueError("the file ends inside its metadata")
            self._pos = pos
            return out
        if etype not in _SCALARS:
            raise ValueError(f"metadata arrays of type {etype} are not supported")
        dt = np.dtype(_SCALARS[etype])
        arr = np.frombuffer(self._read(dt.itemsize * count), dtype=dt)
        return [bool(v) for v in arr] if etype == 7 else arr.tolist()


class _BigEndian(Exception):
    pass


class _Truncated(Exception):
    pass


def _open(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except _BigEndian:
        raise UserError(f"{path} is a big-endian GGUF file, which is not supported") from None
    except _Truncated as exc:
        raise UserError(f"{path} is truncated: tensor {exc} ends past the end of the file") from None
    except (ValueError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        # a bad magic number, an unknown type, or a file cut short mid-metadata
        raise UserError(f"{path} is not a valid GGUF file (corrupt or truncated: {exc})") from exc


def _shortest_float(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> TransformerConfig:
    """TransformerConfig from GGUF metadata; ``shapes``: tensor name -> shape (torch order)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{key}")
        return value

    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise UserError(f"RoPE scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts; we need them uniform
        if len(set(n_kv)) != 1:
            raise UserError(
                "GGUF models with a different KV head count per layer are not supported"
            )
        n_kv = n_kv[0]
    dim = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise UserError("GGUF models with different key and value head sizes are not supported")
    if arch != "gpt2" and int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UserError("partial rotary embeddings (rope.dimension_count < head dim) not supported")
    eps_key = (
        "attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon"
    )
    return TransformerConfig(
        arch="gpt2" if arch == "gpt2" else "llama",
        vocab_size=shapes["token_embd.weight"][0],
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        hidden_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        norm_eps=_shortest_float(get(eps_key)),
        rope_theta=_shortest_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in shapes,
        attn_bias=arch == "qwen2" or "blk.0.attn_q.bias" in shapes,
        head_dim=head_dim,
    )


# -- mapping to our names ---------------------------------------------------------------------

# our name -> the GGUF tensors fused (row-concatenated) into it, each with the head count to
# undo llama.cpp's Q/K permutation with (None: no permutation)
_Plan = dict[str, list[tuple[str, int | None]]]


def _plan(cfg: TransformerConfig, arch: str) -> _Plan:
    """Which GGUF tensors make up each of our tensors (before checking which exist)."""
    # Only LlamaModel's converter permutes Q/K rows (Qwen2's and GPT-2's do not).
    q_heads, k_heads = (cfg.n_heads, cfg.n_kv_heads) if arch == "llama" else (None, None)
    plan: _Plan = {"embed.weight": [("token_embd.weight", None)]}
    if arch == "gpt2":
        plan["pos_embed.weight"] = [("position_embd.weight", None)]
    for i in range(cfg.n_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            plan[f"{o}attn_norm.{kind}"] = [(f"{b}attn_norm.{kind}", None)]
            plan[f"{o}ffn_norm.{kind}"] = [(f"{b}ffn_norm.{kind}", None)]
            plan[f"{o}attn.o_proj.{kind}"] = [(f"{b}attn_output.{kind}", None)]
            plan[f"{o}ffn.down.{kind}"] = [(f"{b}ffn_down.{kind}", None)]
            if arch == "gpt2":
                plan[f"{o}attn.qkv.{kind}"] = [(f"{b}attn_qkv.{kind}", None)]
                plan[f"{o}ffn.up.{kind}"] = [(f"{b}ffn_up.{kind}", None)]
            else:
                plan[f"{o}attn.qkv.{kind}"] = [
                    (f"{b}attn_q.{kind}", q_heads),
                    (f"{b}attn_k.{kind}", k_heads),
                    (f"{b}attn_v.{kind}", None),
                ]
                plan[f"{o}ffn.gate_up.{kind}"] = [
                    (f"{b}ffn_gate.{kind}", None),
                    (f"{b}ffn_up.{kind}", None),
                ]
    plan["norm.weight"] = [("output_norm.weight", None)]
    plan["norm.bias"] = [("output_norm.bias", None)]
    plan["lm_head.weight"] = [("output.weight", None)]
    return plan


def _unpermute_index(rows: int, n_heads: int, name: str) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved pairs -> rotate-half).

    convert_hf_to_gguf.py stores ``w.reshape(n, 2, hd // 2, ...).swapaxes(1, 2)``; taking rows
    ``index`` of the stored tensor gives back Hugging Face's rows.
    """
    if rows % (2 * n_heads):
        raise UserError(
            f"GGUF tensor {name} has {rows} rows, not a multiple of 2 x {n_heads} heads"
        )
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def _block_weight(
    present: list[tuple[str, int | None]], infos: dict[str, TensorInfo], shape: tuple[int, int]
) -> BlockWeight:
    """The (fused) weight as views of the file's blocks (see :class:`BlockWeight`)."""
    parts = []
    for name, heads in present:
        t = infos[name]
        n = int(t.shape[-1])  # rows: ggml lists the fastest dimension first
        data = _u8(t.data).reshape(n, -1)
        perm = None
        if heads is not None:  # stored row index[i] is our row i: send stored row r to inv[r]
            perm = np.argsort(_unpermute_index(n, heads, name)).astype(np.int32)
        parts.append(BlockTensor(Q(t.tensor_type).name, data, perm))
    return BlockWeight(tuple(parts), shape)


def _build(
    plan: _Plan,
    infos: dict[str, TensorInfo],
    shapes: dict[str, tuple[int, ...]],
    native: bool = False,
) -> dict[str, Any]:
    """Dequantize every planned tensor into its (fused) float32 output, or with ``native`` keep
    block-quantized 2-D weights as :class:`BlockWeight`; GGUF tensors left over are an error
    (e.g. Llama-3's rope_freqs: the model would silently ignore them)."""
    used = {name for parts in plan.values() for name, _ in parts}
    if unknown := sorted(set(infos) - used):
        raise UserError(f"GGUF file has tensors this loader does not understand: {unknown[:4]}")
    sd: dict[str, torch.Tensor] = {}
    for ours, parts in plan.items():
        present = [(name, heads) for name, heads in parts if name in infos]
        if not present:
            continue
        if len(present) != len(parts):
            missing = [name for name, _ in parts if name not in infos]
            raise UserError(f"GGUF file lacks {', '.join(missing)}")
        tails = {shapes[name][1:] for name, _ in present}
        if len(tails) != 1:
            got = ", ".join(f"{name} {shapes[name]}" for name, _ in present)
            raise UserError(f"GGUF tensors cannot be fused, their shapes disagree: {got}")
        rows = [shapes[name][0] for name, _ in present]
        tail = tails.pop()
        if native and len(tail) == 1 and all(
            infos[name].tensor_type in NATIVE_TYPES for name, _ in present
        ):
            sd[ours] = _block_weight(present, infos, (sum(rows), tail[0]))
            continue
        out = np.empty((sum(rows), *tail), dtype=np.float32)
        start = 0
        for (name, heads), n in zip(present, rows, strict=True):
            t = infos[name]
            raw = _u8(t.data)
            if heads is not None and out.ndim == 2:  # reorder the (still quantized) rows
                raw = raw.reshape(n, -1)[_unpermute_index(n, heads, name)]
            dequantize_into(raw, t.tensor_type, out[start : start + n])
            if heads is not None and out.ndim == 1:  # a bias: reorder after dequantizing
                out[start : start + n] = out[start : start + n][_unpermute_index(n, heads, name)]
            start += n
        sd[ours] = torch.from_numpy(out)
    return sd


def _file_type(meta: dict[str, Any], reader: GGUFFile) -> str:
    """llama.cpp's file type name ("Q4_1", "F16"), else the most common tensor type."""
    try:
        return LlamaFileType(int(meta["general.file_type"])).name.split("_", 1)[1]
    except (KeyError, ValueError, IndexError):
        types = [t.tensor_type.name for t in reader.tensors]
        return max(set(types), key=types.count) if types else "unknown"


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, native: bool = False) -> Checkpoint:
    """Load a GGUF file: config, state dict (our names; float tensors in ``dtype``, and with
    ``native`` the block-quantized 2-D weights as :class:`BlockWeight`), tokenizer."""
    reader = _open(path)
    meta = reader.metadata
    infos = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in infos:
        raise UserError(f"{path}: GGUF file has no token_embd.weight tensor")
    # ggml lists dimensions fastest-first; torch wants them reversed
    shapes = {n: tuple(reversed(t.shape)) for n, t in infos.items()}
    cfg = _config(meta, shapes)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    cfg.bos_token_id = tokenizer.bos_id
    cfg.eos_token_ids = list(tokenizer.eos_ids)

    sd = _build(_plan(cfg, meta["general.architecture"]), infos, shapes, native)
    check_state_dict(sd, cfg, path)
    check_tokenizer(tokenizer, cfg, path)
    return Checkpoint(
        config=cfg,
        state_dict={k: v.to(dtype).contiguous() if isinstance(v, torch.Tensor) else v for k, v in sd.items()},
        tokenizer=tokenizer,
        source=str(path),
        file_type=_file_type(meta, reader),
        original_bytes=path.stat().st_size,
    )


def linear_weight_bits(path: Path) -> tuple[int, float]:
    """(weights, stored bits) of a GGUF file's linear weights, counted as
    :func:`mlsyskit.quant.perplexity.linear_weight_bits` counts ours: every 2-D ``blk.*``
    weight and the output projection (``output.weight``, or ``token_embd.weight`` when the
    embedding is tied), at the bytes its block format takes (e.g. Q4_K: 144 bytes per 256)."""
    reader = _open(Path(path))
    names = {t.name for t in reader.tensors}
    n, bits = 0, 0.0
    for t in reader.tensors:
        head = t.name == "output.weight" or (
            t.name == "token_embd.weight" and "output.weight" not in names
        )
        if len(t.shape) == 2 and ((t.name.startswith("blk.") and t.name.endswith(".weight")) or head):
            n += int(np.prod(t.shape))
            bits += t.n_bytes * 8
    return n, bits
