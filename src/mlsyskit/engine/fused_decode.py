"""Decode steps with one C call per layer (``csrc/decode.c`` via :mod:`mlsyskit.quant.kernels`).

A decode step of a small model at batch 1 is short enough that PyTorch's per-op cost (~35 ops
per layer: norms, RoPE, the KV write, SwiGLU, residual adds) rivals the matrix products. For the
Llama family with quantized weights (a GGUF file run natively, or ``mlsyskit quantize``
layers) a step whose rows are all decodes, fewer than ``DENSE_ROWS`` of them, runs each layer
as one call instead; prefill chunks, mixed steps and large batches keep the module path (whose
dense GEMMs win there). Both paths compute the same math with the same quantized products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlsyskit.engine.attention import PagedKVCache
from mlsyskit.models.blocks import RMSNorm
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import DENSE_ROWS, BlockLinear, QuantLinear

MAX_ROWS = DENSE_ROWS - 1  # decode rows a fused step takes


def _kernel_weight(m: object) -> kernels.QWeight | None:
    """The kernels' view of a quantized linear layer without a bias, else None."""
    if isinstance(m, (QuantLinear, BlockLinear)) and m._qw is not None:
        return m._qw
    return None


class FusedDecoder:
    """The model's layers as :class:`mlsyskit.quant.kernels.DecodeLayer` descriptors."""

    @staticmethod
    def supports(model: Transformer, kv: PagedKVCache | None) -> bool:
        """Llama family, every projection quantized with a kernel, float32 norms and KV pool."""
        cfg = model.cfg
        if cfg.gpt2 or kv is None or not kv.in_place_decode or cfg.head_dim > 512:
            return False
        for layer in model.layers:
            attn, ffn = layer.attn, layer.ffn
            weights = [getattr(attn, "qkv", None), attn.o_proj, getattr(ffn, "gate_up", None), ffn.down]
            if any(_kernel_weight(w) is None for w in weights):
                return False
            if any(w.bias is not None for w in weights[1:]):
                return False
            if weights[0].bias is not None and weights[0].bias.dtype != torch.float32:
                return False
            norms = (layer.attn_norm, layer.ffn_norm)
            if not all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 for n in norms):
                return False
        return True

    def __init__(self, model: Transformer, kv: PagedKVCache) -> None:
        cfg = model.cfg
        self.model = model
        self.dims = kernels.DecodeDims(
            cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, kv.block_size,
            model.layers[0].attn_norm.eps, model.rope_cos.data_ptr(), model.rope_sin_signed.data_ptr(),
        )
        self.layers = []
        for i, layer in enumerate(model.layers):
            w = [_kernel_weight(m) for m in (layer.attn.qkv, layer.attn.o_proj, layer.ffn.gate_up, layer.ffn.down)]
            bias = layer.attn.qkv.bias
            self.layers.append(kernels.DecodeLayer(
                *(q.address for q in w), *(len(q.parts) for q in w),
                0 if bias is None else bias.data_ptr(),
                layer.attn_norm.weight.data_ptr(), layer.ffn_norm.weight.data_ptr(),
                kv.k[i].data_ptr(), kv.v[i].data_ptr(),
            ))
        per_row = 2 * cfg.dim + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        per_row += cfg.n_heads * cfg.head_dim + 3 * cfg.hidden_dim
        self.scratch = torch.empty(MAX_ROWS * per_row, dtype=torch.float32)

    def forward(self, ids: Tensor, pos: Tensor, slots: Tensor, tables: Tensor, lens: Tensor) -> Tensor:
        """Hidden states (B, dim) after the last layer for B decode tokens: ``ids`` (B,) token ids,
        ``pos`` (B,) int32 positions, ``slots``/``tables``/``lens`` as for the paged attention."""
        x = self.model.embed(ids).float().contiguous()
        for layer in self.layers:
            kernels.decode_layer(layer, self.dims, x, pos, slots, tables, lens, self.scratch)
        return x

