"""`QuantScheme`: which modules are quantized, and how their weights and input activations are quantized."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Tuple

from .quant.args import QuantArgs
from .errors import HfquantError


EMBEDDING_OPTIONS = (None, "int8")


class SchemeError(HfquantError, ValueError):
    """An inconsistent scheme; the message names the field."""


@dataclass(frozen=True)
class QuantScheme:
    """A named preset.

    targets: module class names (e.g. "Linear") or regexes prefixed with "re:" matched against module names.
    ignore: module names (exact, or a final component like "lm_head") or "re:" regexes that stay unquantized.
    input_activations: None for weight-only schemes; dynamic args are computed per batch at run time.
    """

    name: str
    weights: Optional[QuantArgs]
    input_activations: Optional[QuantArgs] = None
    targets: Tuple[str, ...] = ("Linear",)
    ignore: Tuple[str, ...] = ("lm_head",)
    description: str = ""
    format: str = field(default="int")  # "int" = hfquant's integer-code format; backends may define others
    options: dict = field(default_factory=dict, hash=False)  # backend-specific settings (e.g. bitsandbytes)
    # The input embedding (and a tied lm_head): None keeps it in floating point; "int8": int8 codes, one scale per row.
    embedding: Optional[str] = None

    def __post_init__(self) -> None:
        if self.weights is None and self.input_activations is None:
            raise SchemeError(f"scheme {self.name!r} quantizes nothing: set weights and/or input_activations")
        if self.weights is not None and self.weights.dynamic:
            raise SchemeError(f"scheme {self.name!r}: weights cannot be dynamic (they are known ahead of time)")
        if self.embedding not in EMBEDDING_OPTIONS:
            named = ", ".join(o for o in EMBEDDING_OPTIONS if o)
            raise SchemeError(f"scheme {self.name!r}: embedding must be {named} (int8 codes, one scale per row) or "
                              f"null (floating point), got {self.embedding!r}")
        for pattern in self.targets + self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise SchemeError(f"scheme {self.name!r}: bad regex {pattern!r}: {exc}") from None

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None

    @property
    def needs_calibration_data(self) -> bool:
        """True when static activation ranges must be observed on data."""
        act = self.input_activations
        return act is not None and not act.dynamic

    def with_observer(self, observer: str) -> "QuantScheme":
        """The same scheme with every non-dynamic tensor observed by `observer`."""
        w = self.weights.replace(observer=observer) if self.weights else None
        a = self.input_activations
        if a is not None and not a.dynamic:
            a = a.replace(observer=observer)
        return replace(self, weights=w, input_activations=a)

    def is_target(self, module_name: str, module) -> bool:
        """Whether `module` (called `module_name` in the model) is quantized by this scheme."""
        if _matches(module_name, self.ignore):
            return False
        cls = type(module).__name__
        for pattern in self.targets:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name):
                    return True
            elif pattern == cls:
                return True
        return False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["ignore"] = list(self.ignore)
        if self.embedding is None:
            del d["embedding"]  # written only when set: earlier runs' records and cache keys stay as they were
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "QuantScheme":
        data = dict(data)
        for key in ("weights", "input_activations"):
            if data.get(key) is not None:
                data[key] = QuantArgs.from_dict(dict(data[key]))
        data["targets"] = tuple(data.get("targets", ("Linear",)))
        data["ignore"] = tuple(data.get("ignore", ("lm_head",)))
        data["options"] = dict(data.get("options") or {})
        return cls(**data)


def _matches(module_name: str, patterns: Tuple[str, ...]) -> bool:
    last = module_name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], module_name):
                return True
        elif pattern in (module_name, last):
            return True
    return False
