"""Load a GGUF file (llama.cpp's format) into our config, state dict and tokenizer.

Reads the file memory-mapped with ``gguf.GGUFReader``, dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1
with the vectorized numpy code below, undoes llama.cpp's Q/K row permutation and fuses q|k|v
and gate|up into our layout (names: :mod:`mlsyskit.models.checkpoint`). Fused tensors are
dequantized straight into their slice of the output, so each weight is written once.
Architectures: llama (SmolLM2, TinyLlama, Mistral), qwen2, gpt2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, LlamaFileType, ReaderTensor

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint_types import Checkpoint, check_state_dict, check_tokenizer
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.tokenizer import Tokenizer

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2")


# -- dequantization ---------------------------------------------------------------------------


def _u8(data: np.ndarray) -> np.ndarray:
    """The raw bytes of a tensor as ``GGUFReader`` exposes it (values or blocks), flat uint8."""
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
        o = flat.reshape(-1, block)  # one row per block of 32 values
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
    """Dequantize one tensor as ``GGUFReader`` exposes it (``ReaderTensor.data``) to float32.

    ``shape`` is in torch order (the reverse of GGUF's dimension list).
    """
    out = np.empty(shape, dtype=np.float32)
    dequantize_into(_u8(data), qtype, out)
    return torch.from_numpy(out)


# -- reading the file -------------------------------------------------------------------------


class _Reader(GGUFReader):
    """``GGUFReader``, opened ~3x faster.

    The reader slices its ``np.memmap`` once per metadata value, and every memmap slice runs
    Python-level ``__array_finalize__``: a 49k-token vocabulary costs a million of those (~2.5 s).
    Slicing a plain ndarray view of the same mapping gives the same arrays without that cost.
    """

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
    ) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        dt = np.dtype(dtype)
        arr = plain[offset : offset + dt.itemsize * count].view(dt)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def _open(path: Path) -> GGUFReader:
    try:
        reader = _Reader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        # GGUFReader fails this way on a bad magic number or a file cut short mid-metadata
        raise UserError(f"{path} is not a valid GGUF file (corrupt or truncated: {exc})") from exc
    if reader.byte_order != "I":  # values are read as little-endian below
        raise UserError(f"{path} is a big-endian GGUF file, which is not supported")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    try:
        return {key: field.contents() for key, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt GGUF metadata: {exc}") from exc


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


def _build(
    plan: _Plan, infos: dict[str, ReaderTensor], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Dequantize every planned tensor into its (fused) float32 output; GGUF tensors left over
    are an error (e.g. Llama-3's rope_freqs: the model would silently ignore them)."""
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
        out = np.empty((sum(rows), *tails.pop()), dtype=np.float32)
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


def _file_type(meta: dict[str, Any], reader: GGUFReader) -> str:
    """llama.cpp's file type name ("Q4_1", "F16"), else the most common tensor type."""
    try:
        return LlamaFileType(int(meta["general.file_type"])).name.split("_", 1)[1]
    except (KeyError, ValueError, IndexError):
        types = [t.tensor_type.name for t in reader.tensors]
        return max(set(types), key=types.count) if types else "unknown"


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a GGUF file: config, dequantized state dict (our names, ``dtype``), tokenizer."""
    reader = _open(path)
    meta = _metadata(reader)
    infos = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in infos:
        raise UserError(f"{path}: GGUF file has no token_embd.weight tensor")
    # ggml lists dimensions fastest-first; torch wants them reversed
    shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in infos.items()}
    cfg = _config(meta, shapes)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    cfg.bos_token_id = tokenizer.bos_id
    cfg.eos_token_ids = list(tokenizer.eos_ids)

    sd = _build(_plan(cfg, meta["general.architecture"]), infos, shapes)
    check_state_dict(sd, cfg, path)
    check_tokenizer(tokenizer, cfg, path)
    return Checkpoint(
        config=cfg,
        state_dict={k: v.to(dtype).contiguous() for k, v in sd.items()},
        tokenizer=tokenizer,
        source=str(path),
        file_type=_file_type(meta, reader),
        original_bytes=path.stat().st_size,
    )
