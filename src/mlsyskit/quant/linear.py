"""Weight-only quantized linear layers and ``quantize_(model, config)`` (torchao's shape).

Two layers keep only quantized weights (no float copy) and run the compiled kernels of
:mod:`mlsyskit.quant.kernels` (integer dot products on 32-element blocks, activations quantized
to int8 per block):

- :class:`QuantLinear`: the codes of ``mlsyskit quantize`` / ``quantize_`` (8-bit, and 4-, 3-,
  2-bit codes kept in a nibble each), with rows a multiple of 32;
- :class:`BlockLinear`: a GGUF file's blocks (``BlockWeight`` of
  :mod:`mlsyskit.models.gguf_loader`): Q4_0 / Q4_1 / Q8_0 memory-mapped as the file stores
  them, Q5_0 / Q5_1 / K-quants repacked at load into int4/int8 codes with a scale and zero
  point per 32 (:mod:`mlsyskit.quant.gguf_repack`; exact but for Q6_K/Q2_K, re-quantized).

Up to ``DENSE_ROWS - 1`` rows (decode) go through the integer kernel. From ``DENSE_ROWS`` rows on
(prefill, large batches) the weight is dequantized into a reused buffer and one dense GEMM runs,
in ``prefill_dtype`` (float32 by default; the engine picks bfloat16 where the CPU multiplies it
natively, AMX or AVX-512 BF16: measured here ~2.6x the float32 GEMM for a 512-row prefill).
Measured on SmolLM2's 3072 x 576 Q4_1 weight, one thread: the integer kernel takes 0.54 ms at
16 rows (dequantize + bf16 GEMM 0.81 ms), 0.86 ms at 32 (0.90), 1.44 ms at 64 (1.15). Without
the kernels (no compiler, widths not a multiple of 32) the layer dequantizes in PyTorch and
runs a float32 matmul.

:func:`quantized_linear` is the factory the engine passes to ``build_transformer``: it turns
either kind of quantized weight into its layer.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.gguf_loader import BlockWeight
from mlsyskit.models.transformer import RowEmbedding, attach_linear_weights
from mlsyskit.quant import gguf_repack, kernels
from mlsyskit.quant.llama_cpp_peer import round_activations
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import QuantizedTensor, quantize_tensor

DENSE_ROWS = 32  # rows from which a dequantized dense GEMM beats the integer kernel (see above)

_scratch = threading.local()  # per thread: dtype -> flat buffer the dense weights are written to


def _dense_buffer(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A (rows, cols) view of this thread's reused buffer (valid until the next call)."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    n = shape[0] * shape[1]
    buf = bufs.get(dtype)
    # a buffer made under inference_mode cannot enter autograd-tracked matmuls: make another
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or buf.numel() < n or stale:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


class _KernelLinear(nn.Module):
    """What both quantized layers share: ``forward`` picks the integer kernel or a dense GEMM."""

    in_features: int
    out_features: int
    prefill_dtype: torch.dtype = torch.float32
    _qw: kernels.QWeight | None = None  # the weight as the kernels see it; None: no kernels

    def weight(self) -> Tensor:
        raise NotImplementedError

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype``, written by the kernels into a reused buffer when they are
        available (valid until the next call), else dequantized by PyTorch."""
        if self._qw is None:
            return self.weight().to(dtype)
        return kernels.dequantize(self._qw, dtype, out=_dense_buffer(self._qw.shape, dtype))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._qw is not None and x2.shape[0] < DENSE_ROWS:
            y = kernels.qmatmul(x2, self._qw)
        else:
            w = self.dense_weight(self.prefill_dtype)
            y = (x2.to(w.dtype) @ w.t()).float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


class QuantLinear(_KernelLinear):
    """``y = x W^T + b`` with ``W = scale * (codes - zero)`` stored as integers.

    ``kind``: ``"q8"`` (int8 codes, asymmetric ones stored as q - 128 with the zero point
    - 128), ``"q4"`` (codes of up to 4 bits packed two per byte in GGUF's nibble order,
    symmetric ones stored as q + 8 with a zero point of 8), or ``"dequant"`` (no kernel for this
    shape or machine: the codes as they are).
    """

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.scheme = qt.scheme
        self.out_features, self.in_features = qt.shape
        n, k = qt.shape
        scale = qt.scale.float().expand(n, qt.scale.shape[1]).contiguous()
        g = scale.shape[1]
        bits, sym = qt.scheme.bits, qt.scheme.symmetric
        kz = qt.kernel_zero()  # float zero points: -minimum / scale
        self.kind = "dequant"
        if bits == 8 and kernels.supports(k, k // g):
            self.kind = "q8"
            zero = None
            codes = qt.codes
            if not sym:  # the kernel takes signed codes: an unsigned q is (q - 128) + 128
                codes = (codes.to(torch.int16) - 128).to(torch.int8)
                zero = kz.float().expand(n, g) - 128
            self.register_buffer("codes", codes.contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer("zero", None if zero is None else zero.contiguous())
        elif bits <= 4 and kernels.supports(k, k // g):
            # 3- and 2-bit codes fit in a nibble too: they run on the 4-bit kernel and take 4
            # bits per weight in memory (the file keeps them densely packed).
            self.kind = "q4"
            # the kernel wants unsigned codes: a symmetric code q in [-8, 7] is (q + 8) - 8
            codes = qt.codes.to(torch.int16) + (8 if sym else 0)
            zero = torch.full_like(scale, 8.0) if sym else kz.float().expand(n, g).contiguous()
            self.register_buffer("codes", kernels.pack_q4_blocks(codes.to(torch.uint8)))
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            self.register_buffer("codes", qt.codes.contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer("zero", None if kz is None else kz.float().expand(n, g).contiguous())
        # float zero points: the stored minimums, so the layer gives back its QuantizedTensor
        self.register_buffer("minimum", None if qt.minimum is None else qt.minimum.float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._qw = self._kernel_weight()

    def _kernel_weight(self) -> kernels.QWeight | None:
        if self.kind == "dequant":
            return None
        fmt = "I8" if self.kind == "q8" else "U4"
        gb = self.in_features // self.scale.shape[1] // kernels.BLOCK
        part = kernels.Part(fmt, self.codes.view(torch.uint8), self.scale, self.zero, group_blocks=gb)
        return kernels.QWeight([part], self.in_features)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> QuantLinear:
        # .to(dtype) must not touch what the kernels read (float32 scales and zeros), and the
        # kernels must see the buffers' new addresses
        super()._apply(fn, recurse)
        self.scale = self.scale.float().contiguous()
        if self.zero is not None:
            self.zero = self.zero.float().contiguous()
        if self.minimum is not None:
            self.minimum = self.minimum.float()
        self._qw = self._kernel_weight()
        return self

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scheme: QuantScheme, clip_ratio: float | Tensor = 1.0
    ) -> QuantLinear:
        return cls.from_weight(linear.weight, linear.bias, scheme, clip_ratio)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        scheme: QuantScheme,
        clip_ratio: float | Tensor = 1.0,
    ) -> QuantLinear:
        return cls(quantize_tensor(weight.detach().float(), scheme, clip_ratio), bias)

    def weight(self) -> Tensor:
        """The float32 weight this layer computes with (dequantized on demand)."""
        return self._dequantize(slice(None))

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the weight, dequantized (float32): an embedding lookup, so a
        quantized table serves both the lookup and the tied output projection."""
        ids = ids.reshape(-1)
        if self._qw is not None:
            return kernels.gather_rows(self._qw, ids)
        return self._dequantize(ids)

    def _dequantize(self, rows: slice | Tensor) -> Tensor:
        k = self.in_features
        codes = self.codes[rows]
        codes = kernels.unpack_q4_blocks(codes) if self.kind == "q4" else codes
        scale = self.scale[rows]
        g = scale.shape[1]
        q = codes.float().view(-1, g, k // g)
        if getattr(self, "zero", None) is not None:
            q = q - self.zero[rows].unsqueeze(-1)
        return (q * scale.unsqueeze(-1)).view(-1, k)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (codes, scales, zeros, bias)."""
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        s = self.scheme
        return f"{self.in_features}, {self.out_features}, bits={s.bits}, {s.granularity}, kernel={self.kind}"


class BlockLinear(_KernelLinear):
    """A linear layer computing on a GGUF file's blocks: Q4_0 / Q4_1 / Q8_0 in place (the
    memory-mapped file is the weight; parts fused without copying, Q/K rows reordered by index),
    the other formats repacked once into the kernels' U4/I8 layouts (``requantized_blocks``:
    how many 32-blocks could not be repacked exactly, see :mod:`mlsyskit.quant.gguf_repack`).

    Also serves embedding lookups (:meth:`rows`) when the weight is a token table.

    ``llama_cpp_activations = True`` (``mlsyskit perplexity --activations llama.cpp``) computes
    instead in float32 on the file's exact values with the activations rounded per part as
    llama.cpp's CPU matmuls round them (:func:`mlsyskit.quant.llama_cpp_peer.round_activations`):
    to compare scores with llama.cpp's own.
    """

    llama_cpp_activations = False

    def __init__(self, weight: BlockWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.block_weight = weight
        self.out_features, self.in_features = weight.shape
        self.formats = sorted({p.qtype for p in weight.parts})
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._perms = [None if p.perm is None else torch.from_numpy(p.perm) for p in weight.parts]
        self._qw = None
        self.requantized_blocks = 0
        if kernels.available():
            parts = []
            for p, perm in zip(weight.parts, self._perms, strict=True):
                if p.qtype in kernels.FORMATS:
                    parts.append(kernels.Part(p.qtype, p.data, perm=perm))
                    continue
                r = gguf_repack.repack(p.qtype, p.data, perm)
                parts.append(r.part)
                self.requantized_blocks += r.requantized_blocks
            self._qw = kernels.QWeight(parts, self.in_features)
        else:
            kernels.warn_unavailable("GGUF blocks are dequantized on every call (slow)")

    def weight(self) -> Tensor:
        return self.block_weight.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if not self.llama_cpp_activations:
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features).float()
        w = self.weight()
        ys, start = [], 0
        for p in self.block_weight.parts:  # part i: output rows start.. (perm reorders within)
            ys.append(round_activations(x2, p.qtype) @ w[start : start + p.rows].t())
            start += p.rows
        y = torch.cat(ys, dim=1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the weight, dequantized (float32): an embedding lookup (from the
        file's blocks where the kernels' copy was re-quantized)."""
        ids = ids.reshape(-1)
        if len(self._perms) != 1 or self._perms[0] is not None:
            return self.weight()[ids]
        if self._qw is None or self.requantized_blocks:
            return self.block_weight.dequantize_rows(ids.numpy())
        return kernels.gather_rows(self._qw, ids)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight the layer computes with: the file's blocks (memory-mapped, shared
        with the page cache), or their repacked copy."""
        return self.block_weight.nbytes if self._qw is None else self._qw.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the weight (:attr:`weight_bytes`) and the bias."""
        return self.weight_bytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        requant = f", {self.requantized_blocks} blocks re-quantized" if self.requantized_blocks else ""
        return f"{self.in_features}, {self.out_features}, {'+'.join(self.formats)} blocks{requant}"


def round_activations_like_llama_cpp(model: nn.Module) -> int:
    """Make every :class:`BlockLinear` of ``model`` round its activations as llama.cpp's CPU
    matmuls do (``llama_cpp_activations``); returns how many there are (0: nothing to round)."""
    blocks = [m for m in model.modules() if isinstance(m, BlockLinear)]
    for m in blocks:
        m.llama_cpp_activations = True
    return len(blocks)


def quantized_linear(weight: Any, bias: Tensor | None) -> nn.Module:
    """The layer for a quantized weight of a checkpoint: :class:`QuantLinear` for a
    :class:`QuantizedTensor`, :class:`BlockLinear` for a GGUF ``BlockWeight`` (the
    ``quantized_linear`` factory of ``build_transformer``)."""
    if isinstance(weight, BlockWeight):
        return BlockLinear(weight, bias)
    if isinstance(weight, QuantizedTensor):
        return QuantLinear(weight, bias)
    raise UserError(f"no quantized layer for a weight of type {type(weight).__name__}")


def set_prefill_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """The dtype of the dense GEMMs the quantized layers run from ``DENSE_ROWS`` rows on."""
    for m in model.modules():
        if isinstance(m, _KernelLinear):
            m.prefill_dtype = dtype


@dataclass
class WeightOnlyConfig:
    """Which linear layers to quantize and how (``quantize_``'s argument).

    ``include_lm_head``: also quantize the output projection; for a model with tied embeddings
    the quantized embedding matrix becomes both the head and the lookup table (rows dequantized
    on lookup, :func:`install_tied_table`).
    ``filter(name, module)`` can exclude layers (default: every ``nn.Linear``);
    ``overrides`` maps layer names (``"layers.3.ffn.down"``) to their own scheme.
    """

    scheme: QuantScheme
    include_lm_head: bool = True
    filter: Callable[[str, nn.Module], bool] | None = None
    fit_group_size: bool = True
    overrides: dict[str, QuantScheme] = dataclasses.field(default_factory=dict)

    def scheme_for(self, in_features: int, name: str | None = None) -> QuantScheme:
        """The scheme for a layer (``overrides[name]`` when the layer has one: mixed
        precision, :mod:`mlsyskit.quant.mixed`): with ``fit_group_size``, a group size that
        does not divide ``in_features`` shrinks to the largest one that does (a multiple of 32
        when possible, so the kernels apply), e.g. 128 -> 96 for SmolLM2's 576-wide inputs."""
        s = self.overrides.get(name, self.scheme) if name is not None else self.scheme
        if s.granularity != "group" or in_features % s.group_size == 0 or not self.fit_group_size:
            return s
        sizes = [g for g in range(s.group_size, 0, -1) if in_features % g == 0]
        best = next((g for g in sizes if g % 32 == 0), sizes[0])
        return dataclasses.replace(s, group_size=best)


def int8_weight_only(symmetric: bool = False, **kw: object) -> WeightOnlyConfig:
    """W8A16: 8-bit per-output-channel weights, by default with a zero point per channel
    (on SmolLM2: +0.1 % perplexity, against +0.7 % for symmetric absmax scales)."""
    return WeightOnlyConfig(QuantScheme(bits=8, granularity="channel", symmetric=symmetric), **kw)


def int4_weight_only(group_size: int = 128, **kw: object) -> WeightOnlyConfig:
    """W4A16: 4-bit asymmetric weights with a scale and zero point per ``group_size`` inputs
    (shrunk per layer where it does not divide the input size, see ``scheme_for``)."""
    return WeightOnlyConfig(
        QuantScheme(bits=4, granularity="group", group_size=group_size, symmetric=False), **kw
    )


def parse_quantization(spec: str) -> WeightOnlyConfig:
    """``"int8"``, ``"int4"`` (group 128) or ``"int4-g32"`` style names, as the CLI takes them."""
    name, _, group = spec.partition("-g")
    if name == "int8" and not group:
        return int8_weight_only()
    if name in ("int4", "int3", "int2"):
        try:
            gs = int(group) if group else 128
        except ValueError:
            raise UserError(f"bad group size in {spec!r}; e.g. int4-g128") from None
        return WeightOnlyConfig(
            QuantScheme(bits=int(name[3]), granularity="group", group_size=gs, symmetric=False)
        )
    raise UserError(f"unknown quantization {spec!r}; use int8, int4, int4-g64, int3-g128, ...")


def quantize_(model: nn.Module, config: WeightOnlyConfig) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by :class:`QuantLinear` in place; returns it.

    Works for any module tree (the engine's transformer, the federated-learning CNN/MLP). A
    layer whose input size the scheme's group size does not divide raises UserError.
    """
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (config.filter is None or config.filter(name, m))
        and (config.include_lm_head or not name.endswith("lm_head"))
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(lin, config.scheme_for(lin.in_features, name)))
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    if tied and config.include_lm_head and "lm_head" not in model._modules:
        w = model.embed.weight
        install_tied_table(model, QuantLinear.from_weight(w, None, config.scheme_for(w.shape[1], "lm_head")))
    return model


def install_tied_table(model: nn.Module, layer: nn.Module) -> None:
    """Make the quantized ``layer`` (with ``rows(ids)``) a tied model's embedding table and its
    output projection at once: lookups dequantize the rows they read, the head runs the
    quantized kernels, and the float table is dropped (stored and held once, quantized)."""
    model.lm_head = layer
    model.embed = RowEmbedding(layer)


def attach_quantized(model: nn.Module, weights: dict[str, QuantizedTensor]) -> nn.Module:
    """Install quantized weights (``"<module path>.weight" -> QuantizedTensor``) as QuantLinear
    layers, keeping each layer's bias; ``lm_head.weight`` on a tied model creates the head."""
    return attach_linear_weights(model, weights, QuantLinear)


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers actually held (quantized layers count their codes, GGUF
    block layers their memory-mapped blocks)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    for m in {id(m): m for m in model.modules() if isinstance(m, BlockLinear)}.values():
        total += m.weight_bytes
    return total
