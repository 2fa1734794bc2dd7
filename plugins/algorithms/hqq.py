"""`hqq`: data-free error minimisation — each slice's scale and integer zero point searched to lower the weight
error, starting from the run's observer (HQQ-style, adapted to integer zero points; see `hfquant.quant.hqq`).

Needs no calibration data, so streamed (larger-than-memory) runs get better codes than round-to-nearest too.
"""

from __future__ import annotations

import torch

from hfquant import hookimpl
from hfquant.algorithm import LayerContext
from hfquant.quant import quantize
from hfquant.quant.hqq import optimize_qparams
from hfquant_builtins.algorithms.rtn import observed_qparams


class Hqq:
    """Options: `iterations` (least-squares refits per start), `zero_radius` (integer zero points tried either side
    of the observer's; asymmetric only), `margin` (how far, in steps, a slice's extremes may lie beyond the edge
    codes: 0.5 = rounded, never clipped), `norm` (the p of Σ|w − ŵ|^p that ranks candidates)."""

    requires_data = False
    produces_codes = True

    def __init__(self, *, iterations: int = 3, zero_radius: int = 1, margin: float = 0.5, norm: float = 2.0,
                 **unknown) -> None:
        if unknown:
            raise TypeError(f"hqq got unknown option(s) {sorted(unknown)}; "
                            "allowed: iterations, margin, norm, zero_radius")
        for key, value in (("iterations", iterations), ("zero_radius", zero_radius)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"hqq: {key} must be an integer >= 0, got {value!r}")
        for key, value in (("margin", margin), ("norm", norm)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"hqq: {key} must be a finite number >= 0, got {value!r}")
        if norm == 0:
            raise ValueError("hqq: norm must be > 0 (the error exponent p of Σ|w − ŵ|^p; 2 = squared error)")
        self.iterations, self.zero_radius, self.margin, self.norm = iterations, zero_radius, float(margin), float(norm)

    def start_layer(self, ctx: LayerContext) -> None:
        pass

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        for name, linear in ctx.targets.items():
            mp = ctx.plans[name]
            if mp.weight_args is None or mp.weight_codes is not None:
                continue
            weight, args = linear.weight.detach(), mp.weight_args
            scale, zero_point = observed_qparams(name, weight, args, ctx)
            # every scale tried (the start included) goes through ctx.round_scale before its codes are computed, so
            # the scales returned are exactly the ones the codes below are computed with and the format stores
            scale, zero_point = optimize_qparams(weight, args, (scale, zero_point), self.iterations,
                                                 ctx.round_scale, self.zero_radius, self.margin, self.norm)
            mp.weight_qparams = (scale, zero_point)
            mp.weight_codes = quantize(weight, scale, zero_point, args)


@hookimpl
def register_algorithms(register):
    register("hqq", Hqq)
