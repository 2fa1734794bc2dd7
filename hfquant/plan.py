"""`QuantPlan`: what calibration decided for each target module — the input every backend converts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .errors import HfquantError
from .quant import QuantArgs
from .scheme import QuantScheme

QParams = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModulePlan:
    name: str
    weight_args: Optional[QuantArgs]
    weight_qparams: Optional[QParams] = None
    input_args: Optional[QuantArgs] = None
    input_qparams: Optional[QParams] = None  # static activations only
    # Integer codes (out, in), unpacked, in the codes' one-byte dtype: set by the algorithm that chose them, so
    # the format stores exactly these (computed once; the reported weight error is theirs).
    weight_codes: Optional[torch.Tensor] = None
    tied_to: Optional[str] = None  # an lm_head sharing the codes of this input embedding (scheme.embedding)
    # (Σ(ŵ − w)², Σw²) of these codes, when the algorithm measured it while choosing them (one pass, not two)
    weight_error: Optional[Tuple[float, float]] = None

    def to_config(self) -> dict:
        return {
            "weights": self.weight_args.to_dict() if self.weight_args else None,
            "input_activations": self.input_args.to_dict() if self.input_args else None,
            **({"tied_to": self.tied_to} if self.tied_to else {}),
        }


@dataclass
class QuantPlan:
    scheme: QuantScheme
    observer: str
    observer_options: dict = field(default_factory=dict)
    modules: Dict[str, ModulePlan] = field(default_factory=dict)
    embeddings: Dict[str, dict] = field(default_factory=dict)  # config entries of quantized embeddings (kind: embedding)


class PlanError(HfquantError, ValueError):
    """The scheme does not fit this model (targets match nothing, or something that is not a Linear)."""


def target_modules(model: torch.nn.Module, scheme: QuantScheme) -> Dict[str, torch.nn.Linear]:
    """The Linear modules `scheme` quantizes, by name (ignore list applied)."""
    found = {}
    for name, module in model.named_modules():
        if name and scheme.is_target(name, module):
            if not isinstance(module, torch.nn.Linear):
                raise PlanError(
                    f"scheme {scheme.name!r} targets {name!r}, a {type(module).__name__}; only Linear layers "
                    "can be quantized — narrow scheme.targets"
                )
            found[name] = module
    if not found:
        raise PlanError(
            f"scheme {scheme.name!r} matched no module of {type(model).__name__} "
            f"(targets={list(scheme.targets)}, ignore={list(scheme.ignore)})"
        )
    return found
