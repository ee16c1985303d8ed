"""Models for federated learning, and reusable transformer blocks for LLM inference.

Every model class has a ``supports_vmap`` class attribute: True when per-client training
works under ``torch.func.vmap(torch.func.grad(loss))`` with ``torch.func.functional_call``
over stacked parameters.

Names are imported on first use, so importing the package (as ``mlsyskit --help`` does)
does not load torch.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "Attention": "mlsyskit.models.blocks",
    "Block": "mlsyskit.models.blocks",
    "FeedForward": "mlsyskit.models.blocks",
    "RMSNorm": "mlsyskit.models.blocks",
    "apply_rope": "mlsyskit.models.blocks",
    "rope_cache": "mlsyskit.models.blocks",
    "CharLSTM": "mlsyskit.models.char",
    "CharTransformer": "mlsyskit.models.char",
    "CHAR_MODELS": "mlsyskit.models.registry",
    "IMAGE_MODELS": "mlsyskit.models.registry",
    "MODEL_NAMES": "mlsyskit.models.registry",
    "build_model": "mlsyskit.models.registry",
    "count_parameters": "mlsyskit.models.registry",
    "CNN": "mlsyskit.models.vision",
    "MLP": "mlsyskit.models.vision",
    "LogReg": "mlsyskit.models.vision",
    "TwoNN": "mlsyskit.models.vision",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
