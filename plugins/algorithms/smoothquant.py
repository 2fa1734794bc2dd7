"""`smoothquant`: migrate activation outliers into the weights before w8a8 quantization.

Per-token int8 activations lose the small channels when a few channels are huge. SmoothQuant divides each
input channel by s_j = max|X_j|^α / max|W_j|^(1−α) (folded into the preceding norm, so the model keeps its
architecture) and multiplies the weight columns by s_j: the activation ranges shrink, the weights absorb
them, and the float function is unchanged. α sets how much moves. A fixed α (0.5 in the paper) suits some
layers and hurts others, so by default (`alpha: search`) each group gets the α from a grid — or no smoothing
at all — whose int8-weight × int8-activation output is closest to the float output on a sample of its
calibration rows, quantized exactly as the run will (observer, scale rounding, per-token activations).
Edits weights only; a code producer (rtn, gptq) runs after it. After Xiao et al., "SmoothQuant" (2022).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch

from hfquant import hookimpl
from hfquant.algorithm import AlgorithmError, LayerContext
from hfquant.quant import dynamic_qparams, fake_quantize
from hfquant.quant.smoothing import alpha_grid, column_max_abs, smoothquant_scales
from hfquant.smoothing import LayerGroups, SmoothGroup, fold
from hfquant_builtins.algorithms.awq import weight_quantizer

log = logging.getLogger("hfquant")
OPTIONS = ("alpha", "grid", "max_tokens", "linear_pairs")


class SmoothQuant:
    requires_data = True
    produces_codes = False
    rescales_inputs_only = True  # folds keep each Linear's function; consumers' inputs are divided by s

    def __init__(self, *, alpha="search", grid: int = 10, max_tokens: int = 256, linear_pairs: bool = True,
                 **unknown) -> None:
        if unknown:
            raise TypeError(f"smoothquant got unknown option(s) {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
        if alpha != "search" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0.0 <= alpha <= 1.0):
            raise ValueError(f"smoothquant: alpha must be a number in [0, 1] or 'search', got {alpha!r}")
        for key, value in (("grid", grid), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"smoothquant: {key} must be a positive integer, got {value!r}")
        self.alpha = alpha if alpha == "search" else float(alpha)
        self.grid, self.max_tokens, self.linear_pairs = grid, max_tokens, bool(linear_pairs)
        self.chosen: Dict[str, Optional[float]] = {}  # group → the α picked (None: left unsmoothed), for reports
        rows = max_tokens if alpha == "search" else 0
        self._layer = LayerGroups("smoothquant", self.linear_pairs, _quantized, max_rows=rows)

    def check_layer(self, layer: torch.nn.Module, prefix: str) -> None:
        self._layer.check(layer, prefix)

    def start_layer(self, ctx: LayerContext) -> None:
        self._layer.start(ctx)

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        for group, inputs in self._layer.walk(ctx):
            weight_max = column_max_abs([linear.weight for linear in group.consumers])
            act_max = inputs.max_abs.to(weight_max.device)
            if self.alpha == "search":
                alpha, s = search(group, act_max, weight_max, inputs.rows, ctx, self.grid)
            else:
                alpha, s = self.alpha, smoothquant_scales(act_max, weight_max, self.alpha)
            self.chosen[ctx.prefix + group.label] = alpha
            if s is not None:
                fold(group, s, ctx)


def search(group: SmoothGroup, act_max: torch.Tensor, weight_max: torch.Tensor, rows: torch.Tensor,
           ctx: LayerContext, grid: int) -> Tuple[Optional[float], Optional[torch.Tensor]]:
    """(α, s) — or (None, None) for "leave unsmoothed" — with the smallest quantized output error of the group's
    consumers on `rows`, ‖Q(X/s) Q(W·s)ᵀ − X Wᵀ‖² summed over them."""
    x = rows.to(weight_max.device).float()
    consumers = [(ctx.plans.get(ctx.prefix + local), local, linear)
                 for local, linear in zip(group.consumer_names, group.consumers)]
    consumers = [(plan, local, linear) for plan, local, linear in consumers if plan is not None]
    reference = [x @ linear.weight.float().T for _, _, linear in consumers]
    best = None
    for alpha in [None] + alpha_grid(grid) + [1.0]:
        s = None if alpha is None else smoothquant_scales(act_max, weight_max, alpha)
        err = 0.0
        for (plan, local, linear), ref in zip(consumers, reference):
            err += float((_quantized_output(x, linear.weight.float(), s, plan, ctx, local) - ref).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, alpha, s)
    if best[0] != best[0]:
        raise AlgorithmError(f"smoothquant: the quantized error of {ctx.prefix}{group.label} is NaN; check the "
                             "weights and calibration inputs for overflow")
    log.debug("smoothquant %s%s: alpha=%s", ctx.prefix, group.label, best[1])
    return best[1], best[2]


def _quantized_output(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor], plan, ctx: LayerContext,
                      local: str) -> torch.Tensor:
    """X Wᵀ as the quantized model computes it after smoothing by `s` (None: unsmoothed)."""
    if s is not None:
        x, w = x / s, w * s
    if plan.input_args is not None:
        x = fake_quantize(x, *dynamic_qparams(x, plan.input_args), plan.input_args)
    if plan.weight_args is not None:
        w = weight_quantizer(ctx, plan.weight_args, ctx.prefix + local)(w)
    return x @ w.T


def _quantized(group: SmoothGroup, ctx: LayerContext) -> bool:
    """Whether a consumer is quantized at all (weights or input activations)."""
    plans = [ctx.plans.get(ctx.prefix + name) for name in group.consumer_names]
    return any(p is not None and (p.weight_args is not None or p.input_args is not None) for p in plans)


@hookimpl
def register_algorithms(register):
    register("smoothquant", SmoothQuant)
