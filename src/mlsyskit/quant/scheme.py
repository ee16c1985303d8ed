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
ZERO_POINTS = ("int", "float")
DQ_BITS = 6  # double-quantized scales and minimums: 6-bit codes, as llama.cpp's Q4_K/Q5_K


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
    - ``zero_point`` (asymmetric only): ``"int"``, an integer zero point per group in
      ``[0, 2^b - 1]`` (``w ~ S (q - Z)``, the range includes 0); ``"float"``, the group's
      minimum ``m`` stored like a scale (``w ~ S q + m``, as llama.cpp's Q4_1 and K-quants), so
      the range need not contain 0 and no zero point is rounded.
    - ``double_quant`` ("group" only): the group scales (and float minimums) are themselves
      quantized to 6-bit codes with one ``scale_dtype`` scale per ``super_groups`` groups of
      a row (llama.cpp's K-quants: 8 groups of 32 = 256 values); float minimums are then
      clamped to at most 0, as there.
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float16"
    zero_point: str = "int"
    double_quant: bool = False
    super_groups: int = 8

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
        if self.zero_point not in ZERO_POINTS:
            raise UserError(f"zero_point must be one of {', '.join(ZERO_POINTS)}, got {self.zero_point!r}")
        if self.zero_point == "float" and self.symmetric:
            raise UserError("float zero points need an asymmetric scheme (symmetric has no zero point)")
        if not isinstance(self.double_quant, bool):
            raise UserError(f"double_quant must be true or false, got {self.double_quant!r}")
        if self.double_quant and self.granularity != "group":
            raise UserError("double-quantized scales need granularity 'group'")
        if not _is_int(self.super_groups) or self.super_groups < 1:
            raise UserError(f"super_groups must be a positive integer, got {self.super_groups!r}")

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
        """Average stored bits per weight: codes + 16-bit scales + ``bits``-bit zero points
        (float zero points: 16-bit minimums; double-quantized: 6-bit codes for each plus one
        16-bit scale per super-block of ``super_groups`` groups of a row, for each).

        E.g. 4-bit, group 128, asymmetric: ``4 + (16 + 4) / 128``; 4-bit, group 32, float zero,
        double-quantized: ``4 + (6 + 6) / 32 + 2 * 16 / 256 = 4.5`` (llama.cpp's Q4_K). Packing
        padding (at most one byte per packed tensor) is not counted.
        """
        n = out_features * in_features
        scales = self.n_scales(out_features, in_features)
        per = float(SCALE_BITS)
        if self.double_quant:
            supers = out_features * -(-self.n_groups(in_features) // self.super_groups)
            per = DQ_BITS + supers * SCALE_BITS / scales
        zero = 0.0 if self.symmetric else per if self.zero_point == "float" else self.bits
        return self.bits + scales * (per + zero) / n

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
