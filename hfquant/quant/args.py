"""`QuantArgs`: how one tensor is quantized (bits, range, granularity), validated at construction.

The vocabulary follows compressed-tensors' `QuantizationArgs` so that users of that ecosystem feel at home.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Optional
from ..errors import HfquantError

STRATEGIES = ("tensor", "channel", "group", "token")
MIN_BITS, MAX_BITS = 2, 8
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class QuantArgsError(HfquantError, ValueError):
    """An invalid `QuantArgs` field; the message names the field and the allowed values."""


@dataclass(frozen=True)
class QuantArgs:
    """How to quantize one tensor.

    strategy: "tensor" (one scale), "channel" (one per output row), "group" (one per `group_size` input
    columns of each row; a smaller last group is allowed) or "token" (one per row of an activation, i.e.
    per token; only meaningful with `dynamic=True`).
    """

    num_bits: int = 8
    symmetric: bool = True
    signed: bool = True
    strategy: str = "tensor"
    group_size: Optional[int] = None
    observer: str = "minmax"
    dynamic: bool = False
    #: symmetric only: map each slice's largest-magnitude value to qmin (-8 for int4), sign included, so all
    #: 2**num_bits levels are used (llama.cpp's Q4_0 rule); the scale is negative where that value is positive.
    #: False keeps the restricted rule (|max| → qmax, one level unused) that the int8 tutorials use.
    full_range: bool = False
    #: asymmetric only: keep each slice's zero point as a float (stored as float16) instead of rounding it to an
    #: integer code, so the grid can sit anywhere (HQQ's and GGUF Q4_1's offset); codes are round(x/s + z).
    float_zero_point: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int):
            raise QuantArgsError(f"num_bits must be an integer, got {self.num_bits!r}")
        if not MIN_BITS <= self.num_bits <= MAX_BITS:
            raise QuantArgsError(
                f"num_bits={self.num_bits} is out of range; allowed: {MIN_BITS}..{MAX_BITS}"
            )
        if self.strategy not in STRATEGIES:
            raise QuantArgsError(
                f"strategy={self.strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}"
            )
        if self.strategy == "group":
            if self.group_size is None or isinstance(self.group_size, bool) or not isinstance(
                self.group_size, int
            ):
                raise QuantArgsError("group_size must be a positive integer when strategy='group'")
            if self.group_size <= 0:
                raise QuantArgsError(f"group_size must be > 0, got {self.group_size}")
        elif self.group_size is not None:
            raise QuantArgsError(
                f"group_size={self.group_size} is only used with strategy='group' "
                f"(strategy is {self.strategy!r}); remove group_size or set strategy=group"
            )
        if self.strategy == "token" and not self.dynamic:
            raise QuantArgsError(
                "strategy='token' needs dynamic=True: per-token scales are computed at run time"
            )
        if self.full_range and not (self.symmetric and self.signed):
            raise QuantArgsError("full_range=True needs symmetric=True and signed=True (it maps the largest-magnitude "
                                 "value to qmin); remove full_range or use an asymmetric scheme")
        if self.float_zero_point and self.symmetric:
            raise QuantArgsError("float_zero_point=True needs symmetric=False (a symmetric scheme's zero point is "
                                 "fixed); remove float_zero_point or use an asymmetric scheme such as w4a16-asym")
        if not _NAME.match(str(self.observer)):
            raise QuantArgsError(
                f"observer={self.observer!r} is not a valid plugin name (lower-case-hyphenated)"
            )

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.num_bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.num_bits - 1) - 1 if self.signed else 2**self.num_bits - 1

    def replace(self, **changes: Any) -> "QuantArgs":
        """A copy with some fields changed (validated again)."""
        return QuantArgs(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        """Field values; `full_range` / `float_zero_point` only when set, so configs written before they existed
        read back unchanged (and their digests still match)."""
        data = asdict(self)
        for flag in ("full_range", "float_zero_point"):
            if not data[flag]:
                del data[flag]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantArgs":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise QuantArgsError(
                f"unknown QuantArgs field(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)
