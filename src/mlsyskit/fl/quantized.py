"""Test accuracy of the federated-learning image models before and after INT8 / INT4.

The model comes from a ``mlsyskit fedavg`` run directory (``config.json`` names the model,
``model.safetensors`` holds its weights) or is passed in directly. Its ``nn.Linear`` layers
become :class:`~mlsyskit.quant.linear.QuantLinear` (``quantize_``: real integer weights).
There is no integer convolution here, so with ``quantize_convs`` each conv weight, viewed as
(out_channels, in_channels * kh * kw), is quantized with the same scheme and stored back
dequantized ("fake quantization"): the accuracy is that of the quantized weights, the memory
is not. For McMahan's CNN the linear layers hold 97% of the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.quant.linear import (
    QuantLinear,
    WeightOnlyConfig,
    int4_weight_only,
    int8_weight_only,
    model_bytes,
    quantize_,
)
from mlsyskit.quant.tensor import fake_quantize


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a ``mlsyskit fedavg`` run directory, and the run's config."""
    from safetensors.torch import load_file

    from mlsyskit.fl import rundir
    from mlsyskit.models import build_model

    run_dir = Path(run_dir)
    cfg = rundir.read_json(run_dir / rundir.CONFIG)
    weights = run_dir / rundir.MODEL
    if not cfg or not weights.is_file():
        raise UserError(f"{run_dir} is not a finished fedavg run (needs config.json and model.safetensors)")
    model = build_model(cfg.get("model") or "cnn", num_classes=10)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{weights} does not fit the model {cfg.get('model')!r} ({e})") from None
    return model.eval(), cfg


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on images ``x`` with labels ``y``."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def quantize_image_model(
    model: nn.Module, config: WeightOnlyConfig, quantize_convs: bool = True
) -> nn.Module:
    """A quantized copy of ``model``: linear layers as QuantLinear, conv weights fake-quantized
    with ``config.scheme_for(in_channels * kh * kw)`` when ``quantize_convs``."""
    q = copy.deepcopy(model)
    if quantize_convs:
        with torch.no_grad():
            for m in q.modules():
                if isinstance(m, nn.Conv2d):
                    w = m.weight.reshape(m.weight.shape[0], -1)
                    m.weight.copy_(fake_quantize(w, config.scheme_for(w.shape[1])).view_as(m.weight))
    return quantize_(q, config).eval()


def weight_bits(model: nn.Module, config: WeightOnlyConfig | None, quantize_convs: bool = True) -> float:
    """Average stored bits per weight of the linear (and conv) weights under ``config``."""
    n, bits = 0, 0.0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            k = m.out_features * m.in_features
            n, bits = n + k, bits + k * m.scheme.bits_per_weight(m.out_features, m.in_features)
        elif isinstance(m, nn.Linear | nn.Conv2d):
            out, width = m.weight.shape[0], m.weight[0].numel()
            k = m.weight.numel()
            quantized = config is not None and isinstance(m, nn.Conv2d) and quantize_convs
            b = config.scheme_for(width).bits_per_weight(out, width) if quantized else 32.0
            n, bits = n + k, bits + k * b
    return bits / n


def cnn_quantization_accuracy(
    source: str | Path | nn.Module,
    data_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    group_size: int = 128,
    quantize_convs: bool = True,
) -> dict[str, Any]:
    """Test accuracy of an image model in fp32, INT8 (per channel, with zero points) and INT4
    (groups of ``group_size``, asymmetric, shrunk per layer where it does not divide).

    ``source``: a fedavg run directory or a model. The test images are those of ``mnist-5k``
    (the real 10,000-image MNIST test set when found in ``data_dir``, else its hold-out; never
    downloads); ``limit`` keeps the first ``limit`` of them.
    """
    from mlsyskit.data.load import load_dataset

    model, run = (source, {}) if isinstance(source, nn.Module) else load_run_model(source)
    data = load_dataset("mnist-5k", data_dir, download=False)
    x, y = data.test_x[:limit], data.test_y[:limit]
    rows = [
        {
            "name": "fp32",
            "accuracy": accuracy(model, x, y),
            "bits_per_weight": weight_bits(model, None),
            "model_bytes": model_bytes(model),
        }
    ]
    for name, config in (("int8", int8_weight_only()), (f"int4-g{group_size}", int4_weight_only(group_size))):
        q = quantize_image_model(model, config, quantize_convs)
        rows.append(
            {
                "name": name,
                "accuracy": accuracy(q, x, y),
                "bits_per_weight": weight_bits(q, config, quantize_convs),
                "model_bytes": model_bytes(q),
                "group_sizes": {
                    n: config.scheme_for(m.weight[0].numel()).group_size
                    for n, m in model.named_modules()
                    if isinstance(m, nn.Linear | nn.Conv2d) and config.scheme.granularity == "group"
                },
            }
        )
    base = rows[0]["accuracy"]
    for r in rows:
        r["accuracy_drop"] = round(base - r["accuracy"], 6)
    return {
        "model": run.get("model", type(model).__name__),
        "run_dir": None if isinstance(source, nn.Module) else str(source),
        "test_source": data.test_source,
        "test_images": len(y),
        "quantize_convs": quantize_convs,
        "rows": rows,
    }
