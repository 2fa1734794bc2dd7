"""`hqq`: data-free error minimisation — each slice's scale and integer zero point searched to lower the weight
error, starting from the run's observer (HQQ-style, adapted to integer zero points; see `hfquant.quant.hqq`).
With float zero points (`scheme.weights.float_zero_point=true`) it is HQQ's own zero-only optimisation.

Needs no calibration data, so streamed (larger-than-memory) runs get better codes than round-to-nearest too.
"""

from __future__ import annotations

import torch

from hfquant import hookimpl
from hfquant.algorithm import LayerContext
from hfquant.quant import quantize
from hfquant.quant.hqq import optimize_qparams, optimize_zero_points
from hfquant_builtins.algorithms.rtn import observed_qparams


class Hqq:
    """Options for integer zero points: `iterations` (least-squares refits per start), `zero_radius` (integer zero
    points tried either side of the observer's; asymmetric only), `margin` (how far, in steps, a slice's extremes
    may lie beyond the edge codes: 0.5 = rounded, never clipped), `norm` (the p of Σ|w − ŵ|^p that ranks
    candidates). For float zero points: `zero_iterations` (most zero updates), `lp_norm` and `beta` (HQQ's
    proximal shrinkage of the error: p ≤ 1, and its strength 1/beta)."""

    requires_data = False
    produces_codes = True

    def __init__(self, *, iterations: int = 3, zero_radius: int = 1, margin: float = 0.5, norm: float = 2.0,
                 zero_iterations: int = 20, lp_norm: float = 0.7, beta: float = 10.0, **unknown) -> None:
        if unknown:
            raise TypeError(f"hqq got unknown option(s) {sorted(unknown)}; "
                            "allowed: beta, iterations, lp_norm, margin, norm, zero_iterations, zero_radius")
        for key, value in (("iterations", iterations), ("zero_radius", zero_radius), ("zero_iterations", zero_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"hqq: {key} must be an integer >= 0, got {value!r}")
        for key, value in (("margin", margin), ("norm", norm)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"hqq: {key} must be a finite number >= 0, got {value!r}")
        if norm == 0:
            raise ValueError("hqq: norm must be > 0 (the error exponent p of Σ|w − ŵ|^p; 2 = squared error)")
        if isinstance(lp_norm, bool) or not isinstance(lp_norm, (int, float)) or not 0 < lp_norm <= 1:
            raise ValueError(f"hqq: lp_norm must be in (0, 1], got {lp_norm!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
            raise ValueError(f"hqq: beta must be a finite number > 0, got {beta!r}")
        self.iterations, self.zero_radius, self.margin, self.norm = iterations, zero_radius, float(margin), float(norm)
        self.zero_iterations, self.lp_norm, self.beta = zero_iterations, float(lp_norm), float(beta)

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
            if args.float_zero_point:  # HQQ's own: the observer's (rounded) scale kept, zero points optimised
                scale, zero_point = optimize_zero_points(weight, args, (scale, zero_point), self.zero_iterations,
                                                         self.lp_norm, self.beta)
            else:
                scale, zero_point = optimize_qparams(weight, args, (scale, zero_point), self.iterations,
                                                     ctx.round_scale, self.zero_radius, self.margin, self.norm)
            mp.weight_qparams = (scale, zero_point)
            mp.weight_codes = quantize(weight, scale, zero_point, args)


@hookimpl
def register_algorithms(register):
    register("hqq", Hqq)
