"""Update compression on the wire (``--compress int8``): what a client sends instead of its model.

The client sends its update (its model minus the global model it trained from) quantized with
`mlsyskit.quant`: symmetric int8 codes with one scale per block of BLOCK values (each block a
"channel" of the quantizer, its scale stored as bfloat16, whose range holds any finite
update). That is 1 + 2/BLOCK bytes a parameter instead of 4: about 3.97x fewer bytes up. The
server adds the dequantized update to the global model it sent; every value is within half
its block's scale of the client's. The global model still goes down in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COMPRESSORS = ("int8",)
BLOCK = 256


def _scheme():  # noqa: ANN202 - a QuantScheme
    from mlsyskit.quant import QuantScheme

    return QuantScheme(bits=8, granularity="channel", symmetric=True, scale_dtype="bfloat16")


def quantize_update(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes of the padded update, float32 scales of its blocks) of a flat update."""
    from mlsyskit.quant import quantize_tensor

    n = len(delta)
    padded = F.pad(delta.float(), (0, -n % BLOCK)).view(-1, BLOCK)
    qt = quantize_tensor(padded, _scheme())
    return qt.codes.reshape(-1)[:n].contiguous(), qt.scale.reshape(-1)


def dequantize_update(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 update of `quantize_update`'s output."""
    n = len(codes)
    padded = F.pad(codes.float(), (0, -n % BLOCK)).view(-1, BLOCK)
    return (padded * scales.float()[:, None]).reshape(-1)[:n]


def roundtrip(model: torch.Tensor, global_w: torch.Tensor) -> torch.Tensor:
    """The model the server rebuilds from a client's compressed update."""
    codes, scales = quantize_update(model - global_w)
    return global_w + dequantize_update(codes, scales)
