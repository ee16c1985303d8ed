"""What the simulator needs to know about a model: bytes of weights, bytes of KV cache per
token, FLOPs per token.

Three sources, one result (:class:`ModelSpec`):

* by hand (a TOML table with the architecture: layers, hidden size, heads, ...);
* a Hugging Face ``config.json`` (Llama/Qwen/Mistral-style and GPT-2 keys; the weight bytes are
  the sizes of the ``*.safetensors`` files next to it when there are any);
* GGUF metadata (read with the ``gguf`` package, no tensor data loaded; the weight bytes are the
  tensors' stored sizes, so a Q4 file counts as Q4).

Counting (decoder-only transformer, grouped-query attention):

* parameters of one layer: q and o projections ``2 * hidden * n_heads * head_dim``, k and v
  ``2 * hidden * n_kv_heads * head_dim``, the MLP ``3 * hidden * intermediate`` (gated, SwiGLU)
  or ``2 * hidden * intermediate`` (GPT-2);
* KV bytes per token: ``2 (k and v) * n_layers * n_kv_heads * head_dim * kv_dtype_bytes``;
* FLOPs: ``2`` per weight per token through the layers, ``2 * hidden * vocab`` per sampled token
  for the output head, and ``4 * n_layers * n_heads * head_dim`` per (query token, context
  token) pair for attention (QK^T and AV).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError
from mlsyskit.models.config import read_config_json

DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "fp16": 2.0, "float16": 2.0, "bf16": 2.0, "bfloat16": 2.0,
               "fp8": 1.0, "int8": 1.0, "int4": 0.5}


def dtype_bytes(name: str | float | int) -> float:
    """Bytes per element of a dtype name (fp16, bf16, fp32, int8, int4, fp8) or a number."""
    if isinstance(name, int | float) and not isinstance(name, bool):
        if name <= 0:
            raise UserError(f"bytes per element must be positive, got {name}")
        return float(name)
    key = str(name).lower()
    if key not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPE_BYTES))} or a number of bytes")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer as the cost model sees it."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = True
    gated_mlp: bool = True
    weight_dtype_bytes: float = 2.0
    kv_dtype_bytes: float = 2.0
    max_context: int = 4096
    weight_bytes_override: float | None = None  # measured file size (GGUF, safetensors) or given

    def __post_init__(self) -> None:
        for k in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab", "max_context"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"model {k} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    # -- counts ------------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        attn = 2 * self.hidden * self.n_heads * self.head_dim + 2 * self.hidden * self.n_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attn + mlp + 2 * self.hidden  # + the two norms

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.n_layers * self.layer_params + embed + head + self.hidden

    @property
    def weight_bytes(self) -> float:
        if self.weight_bytes_override is not None:
            return float(self.weight_bytes_override)
        return self.params * self.weight_dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2.0 * self.n_layers * self.n_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def linear_flops_per_token(self) -> float:
        """FLOPs of the layers' matmuls for one token (no attention scores, no output head)."""
        return 2.0 * self.n_layers * (self.layer_params - 2 * self.hidden)

    @property
    def head_flops_per_token(self) -> float:
        """FLOPs of the output head for one sampled token."""
        return 2.0 * self.hidden * self.vocab

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs of attention for one query token against one context token (QK^T and AV)."""
        return 4.0 * self.n_layers * self.n_heads * self.head_dim

    @property
    def activation_bytes_per_token(self) -> float:
        """Bytes of one token's hidden state (what a tensor-parallel all-reduce moves per layer)."""
        return self.hidden * self.weight_dtype_bytes if self.weight_dtype_bytes >= 2 else self.hidden * 2.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(params=self.params, weight_gib=round(self.weight_bytes / 2**30, 3),
                 kv_kib_per_token=round(self.kv_bytes_per_token / 1024, 3),
                 gflops_per_token=round((self.linear_flops_per_token + self.head_flops_per_token) / 1e9, 3))
        return d


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------

_HAND_KEYS = {
    "name", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab",
    "tied_embeddings", "gated_mlp", "dtype", "kv_dtype", "max_context", "weight_gib", "config", "gguf",
}


def model_from_table(table: dict[str, Any], base_dir: Path | None = None) -> ModelSpec:
    """A ``[model]`` TOML table: ``config = "config.json"``, ``gguf = "file.gguf"`` or the
    architecture by hand. ``dtype``, ``kv_dtype``, ``max_context`` and ``weight_gib`` override
    what a file says."""
    unknown = sorted(set(table) - _HAND_KEYS)
    if unknown:
        raise UserError(f"[model]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_HAND_KEYS))}")

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path

    overrides: dict[str, Any] = {}
    if "dtype" in table:
        overrides["weight_dtype_bytes"] = dtype_bytes(table["dtype"])
    if "kv_dtype" in table:
        overrides["kv_dtype_bytes"] = dtype_bytes(table["kv_dtype"])
    if "max_context" in table:
        overrides["max_context"] = int(table["max_context"])
    if "weight_gib" in table:
        overrides["weight_bytes_override"] = float(table["weight_gib"]) * 2**30
    if "name" in table:
        overrides["name"] = str(table["name"])
    if "config" in table and "gguf" in table:
        raise UserError("[model]: give either config or gguf, not both")
    if "config" in table:
        base = model_from_hf_config(resolve(table["config"]))
    elif "gguf" in table:
        base = model_from_gguf(resolve(table["gguf"]))
    else:
        need = ("n_layers", "hidden", "n_heads", "intermediate", "vocab")
        missing = [k for k in need if k not in table]
        if missing:
            raise UserError(f"[model]: missing {', '.join(missing)} (or give config = \"config.json\" / gguf = \"file.gguf\")")
        n_heads = _int(table, "n_heads")
        hidden = _int(table, "hidden")
        base = ModelSpec(
            name=str(table.get("name", "model")),
            n_layers=_int(table, "n_layers"),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=_int(table, "n_kv_heads", n_heads),
            head_dim=_int(table, "head_dim", hidden // n_heads),
            intermediate=_int(table, "intermediate"),
            vocab=_int(table, "vocab"),
            tied_embeddings=bool(table.get("tied_embeddings", True)),
            gated_mlp=bool(table.get("gated_mlp", True)),
        )
    fields = asdict(base)
    fields.update(overrides)
    return ModelSpec(**fields)


def _int(table: dict[str, Any], key: str, default: int | None = None) -> int:
    v = table.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise UserError(f"[model] {key} must be an integer, got {v!r}")
    return v


def model_from_hf_config(path: str | Path) -> ModelSpec:
    """A Hugging Face ``config.json`` (or the directory holding it)."""
    p, hf = read_config_json(path)
    if isinstance(hf.get("text_config"), dict):  # multimodal wrappers keep the LM here
        hf = {**hf, **hf["text_config"]}

    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if hf.get(k) is not None:
                return hf[k]
        if default is None:
            raise UserError(f"{p}: none of {', '.join(keys)} is set")
        return default

    gpt2 = hf.get("model_type") == "gpt2" or "n_embd" in hf
    hidden = int(first("hidden_size", "n_embd", "d_model"))
    n_heads = int(first("num_attention_heads", "n_head"))
    n_kv = int(first("num_key_value_heads", "n_head", default=n_heads)) if not gpt2 else n_heads
    head_dim = int(hf.get("head_dim") or hidden // n_heads)
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float16")
    wbytes = dtype_bytes(dtype) if dtype in DTYPE_BYTES else 2.0
    files = sorted(p.parent.glob("*.safetensors"))
    override = float(sum(f.stat().st_size for f in files)) if files else None
    return ModelSpec(
        name=str(hf.get("_name_or_path") or p.parent.name or "model"),
        n_layers=int(first("num_hidden_layers", "n_layer")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate=int(first("intermediate_size", "n_inner", default=4 * hidden)),
        vocab=int(first("vocab_size")),
        tied_embeddings=bool(hf.get("tie_word_embeddings", gpt2)),
        gated_mlp=not gpt2,
        weight_dtype_bytes=wbytes,
        kv_dtype_bytes=wbytes,
        max_context=int(first("max_position_embeddings", "n_positions", "n_ctx", default=2048)),
        weight_bytes_override=override,
    )


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    """The metadata (scalars and strings; an array reads as its length) and the tensor infos
    (name, shape, ggml type) of a GGUF file, read from its header only: the tensor data and the
    vocabulary strings are skipped, not loaded."""
    import struct

    meta: dict[str, Any] = {}
    tensors: list[tuple[str, list[int], int]] = []
    with open(path, "rb") as f:
        def unpack(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated header")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            return f.read(unpack("<Q")).decode("utf-8", "replace")

        def value(vtype: int) -> Any:
            if vtype in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = unpack("<I"), unpack("<Q")
                if etype == 8:
                    for _ in range(count):
                        f.seek(unpack("<Q"), 1)
                elif etype in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
                else:
                    for _ in range(count):
                        value(etype)
                return count
            raise ValueError(f"unknown metadata type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        for _ in range(n_kv):
            key = string()
            meta[key] = value(unpack("<I"))
        for _ in range(n_tensors):
            name = string()
            dims = [unpack("<Q") for _ in range(unpack("<I"))]
            ttype = unpack("<I")
            unpack("<Q")  # data offset
            tensors.append((name, dims, ttype))
    return meta, tensors


def model_from_gguf(path: str | Path) -> ModelSpec:
    """GGUF metadata (architecture keys) and the stored size of every tensor."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"GGUF file {p} does not exist")
    try:
        meta, tensors = read_gguf_header(p)
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        nbytes = 0.0
        for _, dims, ttype in tensors:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            n = 1
            for d in dims:
                n *= d
            nbytes += n // block * size
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:  # corrupt or foreign: one line
        raise UserError(f"cannot read GGUF metadata from {p}: {e}") from e

    arch = meta.get("general.architecture") or "llama"

    def need(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            if default is None:
                raise UserError(f"{p}: GGUF metadata has no {arch}.{key}")
            return default
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(need("attention.head_count_kv", n_heads))
    head_dim = int(need("attention.key_length", hidden // n_heads))
    names = {t[0] for t in tensors}
    vocab = meta.get("tokenizer.ggml.tokens") or need("vocab_size")
    return ModelSpec(
        name=str(meta.get("general.name") or p.stem),
        n_layers=int(need("block_count")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate=int(need("feed_forward_length", 4 * hidden)),
        vocab=int(vocab),
        tied_embeddings="output.weight" not in names,
        gated_mlp=arch != "gpt2",
        weight_dtype_bytes=2.0,
        kv_dtype_bytes=2.0,
        max_context=int(need("context_length", 2048)),
        weight_bytes_override=nbytes,
    )
