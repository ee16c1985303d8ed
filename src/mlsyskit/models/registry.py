"""Model registry: ``build_model(name, ...)`` and ``count_parameters``."""

from __future__ import annotations

from torch import nn

from mlsyskit.errors import UserError
from mlsyskit.models.char import CharLSTM, CharTransformer
from mlsyskit.models.vision import CNN, MLP, LogReg, TwoNN

IMAGE_MODELS: tuple[str, ...] = ("2nn", "cnn", "mlp", "logreg")
CHAR_MODELS: tuple[str, ...] = ("lstm", "transformer")
MODEL_NAMES: tuple[str, ...] = IMAGE_MODELS + CHAR_MODELS

_IMAGE = {"2nn": TwoNN, "cnn": CNN, "mlp": MLP, "logreg": LogReg}
_CHAR = {"lstm": CharLSTM, "transformer": CharTransformer}


def build_model(
    name: str, *, num_classes: int = 10, vocab_size: int | None = None, seq_len: int = 80
) -> nn.Module:
    """Build a freshly initialised model by name (deterministic under ``torch.manual_seed``).

    Image models use ``num_classes``; char models need ``vocab_size`` (the transformer also
    uses ``seq_len`` as its maximum context).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _IMAGE:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
        return _IMAGE[key](num_classes=num_classes)
    if key in _CHAR:
        if vocab_size is None:
            raise UserError(f"model {key!r} needs vocab_size (it is set from the dataset)")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise UserError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if key == "lstm":
            return CharLSTM(vocab_size)
        if not isinstance(seq_len, int) or seq_len < 1:
            raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
        return CharTransformer(vocab_size, seq_len)
    raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
