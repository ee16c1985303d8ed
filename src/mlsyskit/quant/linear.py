"""Weight-only quantized linear layers and ``quantize_(model, config)`` (torchao's shape).

``QuantLinear`` keeps only the integer codes and their scales (no float copy of the weight):

- 8-bit symmetric and 4-bit weights with rows a multiple of 32 run the compiled AVX2 GEMV of
  :mod:`mlsyskit.quant.kernels` when at most 8 rows come in (decode), reading 1 or 1/2 byte per
  weight instead of 4;
- anything else (prefill, other bit widths, no compiler) dequantizes the weight for that call
  and runs an fp32 matmul: prefill is compute-bound, so the dequantization is a small extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.transformer import attach_linear_weights
from mlsyskit.quant import kernels
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import QuantizedTensor, quantize_tensor


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W = scale * (codes - zero)`` stored as integers."""

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.scheme = qt.scheme
        self.out_features, self.in_features = qt.shape
        n, k = qt.shape
        scale = qt.scale.float().expand(n, qt.scale.shape[1]).contiguous()
        g = scale.shape[1]
        bits, sym = qt.scheme.bits, qt.scheme.symmetric
        self.kind = "dequant"
        if bits == 8 and kernels.supports(k, k // g):
            self.kind = "q8"
            zero = None
            codes = qt.codes
            if not sym:  # the kernel takes signed codes: an unsigned q is (q - 128) + 128
                codes = (codes.to(torch.int16) - 128).to(torch.int8)
                zero = qt.zero.float().expand(n, g) - 128
            self.register_buffer("codes", codes.contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer("zero", None if zero is None else zero.contiguous())
        elif bits <= 4 and kernels.supports(k, k // g):
            # 3- and 2-bit codes fit in a nibble too: they run on the 4-bit kernel and take 4
            # bits per weight in memory (the file keeps them densely packed).
            self.kind = "q4"
            # the kernel wants unsigned codes: a symmetric code q in [-8, 7] is (q + 8) - 8
            codes = qt.codes.to(torch.int16) + (8 if sym else 0)
            zero = torch.full_like(scale, 8.0) if sym else qt.zero.float().expand(n, g).contiguous()
            self.register_buffer("codes", kernels.pack_q4_blocks(codes.to(torch.uint8)))
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            self.register_buffer("codes", qt.codes.contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer(
                "zero", None if qt.zero is None else qt.zero.float().expand(n, g).contiguous()
            )
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

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
        n, k = self.out_features, self.in_features
        codes = kernels.unpack_q4_blocks(self.codes) if self.kind == "q4" else self.codes
        g = self.scale.shape[1]
        q = codes.float().view(n, g, k // g)
        if getattr(self, "zero", None) is not None:
            q = q - self.zero.unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).view(n, k)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.kind == "q8" and x2.shape[0] <= kernels.MAX_ROWS:
            y = kernels.q8_gemv(x2, self.codes, self.scale, self.zero)
        elif self.kind == "q4" and x2.shape[0] <= kernels.MAX_ROWS:
            y = kernels.q4_gemv(x2, self.codes, self.scale, self.zero)
        else:
            y = x2 @ self.weight().t()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (codes, scales, zeros, bias)."""
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        s = self.scheme
        return f"{self.in_features}, {self.out_features}, bits={s.bits}, {s.granularity}, kernel={self.kind}"


@dataclass
class WeightOnlyConfig:
    """Which linear layers to quantize and how (``quantize_``'s argument).

    ``include_lm_head``: also quantize the output projection; for a model with tied embeddings
    a quantized copy of the embedding matrix becomes the head (the lookup table stays float).
    ``filter(name, module)`` can exclude layers (default: every ``nn.Linear``).
    """

    scheme: QuantScheme
    include_lm_head: bool = True
    filter: Callable[[str, nn.Module], bool] | None = None
    fit_group_size: bool = True

    def scheme_for(self, in_features: int) -> QuantScheme:
        """The scheme for a layer: with ``fit_group_size``, a group size that does not divide
        ``in_features`` shrinks to the largest one that does (a multiple of 32 when possible,
        so the kernels apply), e.g. 128 -> 96 for SmolLM2's 576-wide inputs."""
        s = self.scheme
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
        setattr(parent, child, QuantLinear.from_linear(lin, config.scheme_for(lin.in_features)))
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    if tied and config.include_lm_head and "lm_head" not in model._modules:
        w = model.embed.weight
        model.lm_head = QuantLinear.from_weight(w, None, config.scheme_for(w.shape[1]))
    return model


def attach_quantized(model: nn.Module, weights: dict[str, QuantizedTensor]) -> nn.Module:
    """Install quantized weights (``"<module path>.weight" -> QuantizedTensor``) as QuantLinear
    layers, keeping each layer's bias; ``lm_head.weight`` on a tied model creates the head."""
    return attach_linear_weights(model, weights, QuantLinear)


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers actually held (quantized layers count their codes)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
