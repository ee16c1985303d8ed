"""Models for federated learning, and reusable transformer blocks for LLM inference.

Every model class has a ``supports_vmap`` class attribute: True when per-client training
works under ``torch.func.vmap(torch.func.grad(loss))`` with ``torch.func.functional_call``
over stacked parameters.
"""

from mlsyskit.models.blocks import (
    Attention,
    Block,
    FeedForward,
    RMSNorm,
    apply_rope,
    rope_cache,
)
from mlsyskit.models.char import CharLSTM, CharTransformer
from mlsyskit.models.registry import (
    CHAR_MODELS,
    IMAGE_MODELS,
    MODEL_NAMES,
    build_model,
    count_parameters,
)
from mlsyskit.models.vision import CNN, MLP, LogReg, TwoNN

__all__ = [
    "CHAR_MODELS",
    "CNN",
    "IMAGE_MODELS",
    "MLP",
    "MODEL_NAMES",
    "Attention",
    "Block",
    "CharLSTM",
    "CharTransformer",
    "FeedForward",
    "LogReg",
    "RMSNorm",
    "TwoNN",
    "apply_rope",
    "build_model",
    "count_parameters",
    "rope_cache",
]
