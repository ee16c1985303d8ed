"""QuantScheme: how a weight matrix is quantized (bits, scale granularity, zero point).

Pure Python (no torch) so that argument parsing and config files can use it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mlsyskit.errors import UserError

BITS = (8, 4, 3, 2)
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = ("float16", "bfloat16")
SCALE_BITS = 16  # both scale dtypes take 16 bits per stored scale


@dataclass(frozen=True)
class QuantScheme:
    """A weight quantization scheme for 2-D weights of shape (out_features, in_features).

    - ``bits``: 8, 4, 3 or 2 bits per weight code.
    - ``granularity``: one scale for the whole ``"tensor"``, one per output row
      (``"channel"``), or one per ``group_size`` consecutive inputs of each row (``"group"``).
    - ``group_size``: the group length for ``"group"``; must divide ``in_features``.
    - ``symmetric``: True: absmax scaling, zero point 0, signed codes in ``[qmin, qmax]`` =
      ``[-(2^(b-1)-1), 2^(b-1)-1]``; False: min/max scaling with an integer zero point,
      unsigned codes in ``[0, 2^b - 1]``.
    - ``scale_dtype``: the dtype scales are stored in, ``"float16"`` or ``"bfloat16"``.
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in BITS:
            raise UserError(f"quantization bits must be one of {list(BITS)}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise UserError(
                f"unknown quantization granularity {self.granularity!r}; "
                f"choose one of {', '.join(GRANULARITIES)}"
            )
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise UserError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise UserError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise UserError(
                f"unknown scale dtype {self.scale_dtype!r}; choose one of {', '.join(SCALE_DTYPES)}"
            )

    @property
    def qmin(self) -> int:
        """Smallest code: -(2^(b-1)-1) when symmetric (the range is kept symmetric), else 0."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: 2^(b-1)-1 when symmetric, else 2^b - 1."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Scales per output row: ``in_features / group_size`` for "group", else 1.

        Raises UserError when the group size does not divide ``in_features``.
        """
        if self.granularity != "group":
            return 1
        if in_features % self.group_size:
            raise UserError(
                f"group_size {self.group_size} does not divide in_features {in_features}; "
                "choose a group size that divides it"
            )
        return in_features // self.group_size

    def n_scales(self, out_features: int, in_features: int) -> int:
        """How many scales (and zero points, when asymmetric) a weight of this shape stores."""
        if self.granularity == "tensor":
            return 1
        return out_features * self.n_groups(in_features)

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Average stored bits per weight: codes + 16-bit scales + ``bits``-bit zero points.

        E.g. 4-bit, group 128, asymmetric: ``4 + (16 + 4) / 128``. Packing padding (at most one
        byte per packed tensor) is not counted.
        """
        n = out_features * in_features
        per_scale = SCALE_BITS + (0 if self.symmetric else self.bits)
        return self.bits + self.n_scales(out_features, in_features) * per_scale / n

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``QuantScheme.from_dict`` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> QuantScheme:
        """The scheme of a ``to_dict`` dict (missing keys take their defaults)."""
        if not isinstance(d, dict):
            raise UserError(f"a quantization scheme must be a JSON object, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"unknown quantization scheme key(s) {unknown}; known keys: {sorted(known)}"
            )
        return cls(**d)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
