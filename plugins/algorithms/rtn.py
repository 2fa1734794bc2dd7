"""`rtn`: round-to-nearest — the run's observer picks each target's range, codes are the rounded weights.

It is what every run did before algorithms existed, and what the driver falls back to for any target that no
code-producing algorithm handled.
"""

from __future__ import annotations

import torch

from hfquant import hookimpl
from hfquant.algorithm import LayerContext
from hfquant.pipeline.integrity import NonFiniteError
from hfquant.quant import quantize_with_error


class RoundToNearest:
    requires_data = False
    produces_codes = True

    def __init__(self) -> None:
        pass

    def start_layer(self, ctx: LayerContext) -> None:
        pass

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        for name, linear in ctx.targets.items():
            mp = ctx.plans[name]
            if mp.weight_args is None or mp.weight_codes is not None:
                continue
            scale, zero_point = observed_qparams(name, linear.weight.detach(), mp.weight_args, ctx)
            # the observer refused NaN/Inf already (checked=True); the error comes with the codes, in one pass
            codes, error, energy = quantize_with_error(linear.weight.detach(), scale, zero_point, mp.weight_args,
                                                       checked=True)
            mp.weight_qparams, mp.weight_codes, mp.weight_error = (scale, zero_point), codes, (error, energy)


def observed_qparams(name: str, weight: torch.Tensor, args, ctx: LayerContext):
    """The run's observer's (scale, zero point) for `weight`, the scale rounded as the backend stores it; a NaN/Inf
    weight is refused by name (the starting point of every code producer that refines observer ranges)."""
    observer = ctx.make_observer(args)
    try:
        observer.observe(weight)
    except ValueError as exc:
        if "NaN or Inf" not in str(exc):
            raise
        raise NonFiniteError(f"{name}.weight: {exc}") from None  # say which weight
    scale, zero_point = observer.qparams()
    return ctx.round_scale(scale), zero_point


@hookimpl
def register_algorithms(register):
    register("rtn", RoundToNearest)
