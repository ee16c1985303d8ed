"""Weight quantization: schemes, quantized tensors, bit packing and a quantized checkpoint format.

``from mlsyskit.quant import QuantScheme, quantize_tensor``. Names are imported on first use so
that importing the package (e.g. for the CLI's ``--help``) does not load torch.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "QuantScheme": "mlsyskit.quant.scheme",
    "QuantizedTensor": "mlsyskit.quant.tensor",
    "quantize_tensor": "mlsyskit.quant.tensor",
    "dequantize_tensor": "mlsyskit.quant.tensor",
    "fake_quantize": "mlsyskit.quant.tensor",
    "search_clip_ratio": "mlsyskit.quant.tensor",
    "quantize_bias": "mlsyskit.quant.tensor",
    "theoretical_max_error": "mlsyskit.quant.tensor",
    "pack": "mlsyskit.quant.packing",
    "unpack": "mlsyskit.quant.packing",
    "packed_nbytes": "mlsyskit.quant.packing",
    "save_quantized": "mlsyskit.quant.storage",
    "load_quantized": "mlsyskit.quant.storage",
    "storage_bytes": "mlsyskit.quant.storage",
    "QuantLinear": "mlsyskit.quant.linear",
    "quantize_": "mlsyskit.quant.linear",
    "WeightOnlyConfig": "mlsyskit.quant.linear",
    "int8_weight_only": "mlsyskit.quant.linear",
    "int4_weight_only": "mlsyskit.quant.linear",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
