"""`awq`: activation-aware scaling — per-input-channel scales searched on calibration inputs, folded into the
preceding norm / Linear.

Channels whose inputs are large matter most to the output; scaling their weight columns up (and the input
down, inside the previous op) gives them finer quantization steps. For each group (a norm or Linear and the
Linears reading its output) the scales are s = mean|x|^α for the α in a grid that minimises the group's
quantized output error on a sample of calibration rows, ‖(Q(W·s)/s − W) Xᵀ‖², with the run's own quantizer
(observer + backend scale rounding). α = 0 is "no scaling", so the result is never worse than round-to-nearest
on the sample; the grid is searched coarse to fine by default (at most 9 of its 20 points; `search=full` tries
them all). It edits weights only: a code producer (rtn, gptq) runs after it, and the saved model keeps its
architecture. After Lin et al., "AWQ" (2023).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from hfquant import hookimpl
from hfquant.algorithm import AlgorithmError, LayerContext
from hfquant.quant import fake_quantize
from hfquant.quant.clipping import clip_by_output_error
from hfquant.quant.smoothing import (alpha_grid, awq_scales, coarse_to_fine_argmin, error_basis, output_error,
                                     scaled_quant_delta)
from hfquant.smoothing import LayerGroups, SmoothGroup, fold
from hfquant_builtins.algorithms.rtn import observed_qparams

log = logging.getLogger("hfquant")
OPTIONS = ("grid", "max_tokens", "linear_pairs", "clip", "search")
SEARCHES = ("coarse_to_fine", "full")
# AWQ's rule: the query and key projections meet in a softmax, where a clipped outlier costs more than elsewhere
NOT_CLIPPED = ("q_proj", "k_proj", "query", "key")


class ActivationAwareScaling:
    requires_data = True
    produces_codes = False
    rescales_inputs_only = True  # folds keep each Linear's function; consumers' inputs are divided by s

    def __init__(self, *, grid: int = 20, max_tokens: int = 2048, linear_pairs: bool = True, clip: bool = False,
                 search: str = "coarse_to_fine", **unknown) -> None:
        if unknown:
            raise TypeError(f"awq got unknown option(s) {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
        for key, value in (("grid", grid), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"awq: {key} must be a positive integer, got {value!r}")
        if search not in SEARCHES:
            raise ValueError(f"awq: search must be one of {', '.join(SEARCHES)}, got {search!r}")
        self.grid, self.max_tokens, self.linear_pairs, self.clip = grid, max_tokens, bool(linear_pairs), bool(clip)
        self.search = search
        self.chosen: Dict[str, float] = {}  # "model.layers.3.input_layernorm -> ..." → the α picked (for reports)
        self._layer = LayerGroups("awq", self.linear_pairs, _quantized, max_rows=max_tokens)

    def check_layer(self, layer: torch.nn.Module, prefix: str) -> None:
        self._layer.check(layer, prefix)

    def start_layer(self, ctx: LayerContext) -> None:
        self._layer.start(ctx)

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        searched = []
        for group, inputs in self._layer.walk(ctx):
            alpha, s = search(group, inputs.mean_abs, inputs.rows, ctx, self.grid, self.search == "full")
            self.chosen[ctx.prefix + group.label] = alpha
            if alpha:
                fold(group, s, ctx)
            if self.clip and inputs.rows is not None:  # the consumers' inputs once divided by the folded scales
                searched.append((group, inputs.rows / s.to(inputs.rows.device) if alpha else inputs.rows))
        # After every fold: each consumer's weights and inputs as the code producer will see them. (A code producer
        # sharing this calibration pass gathered its statistics before; clipping v_proj or up_proj changes the inputs
        # of o_proj / down_proj slightly — measured a tie with gptq, docs/benchmarks.md "Sixth pass".)
        for group, rows in searched:
            clip_consumers(group, rows, ctx)


def _quantized(group: SmoothGroup, ctx: LayerContext) -> bool:
    """Whether a consumer's weights are quantized (else scaling buys nothing)."""
    return any(_weight_args(ctx, name) is not None for name in group.consumer_names)


def _weight_args(ctx: LayerContext, local: str):
    plan = ctx.plans.get(ctx.prefix + local)
    return None if plan is None else plan.weight_args


def search(group: SmoothGroup, mean_abs: torch.Tensor, rows: Optional[torch.Tensor], ctx: LayerContext,
           grid: int, full: bool = False):
    """(α, s) with the smallest quantized output error of the group's quantized consumers on `rows`: every α of
    the grid when `full`, else coarse to fine (the same α whenever the error along the grid has a single strict
    minimum and falls on both sides of it)."""
    device = group.consumers[0].weight.device
    basis = error_basis(rows.to(device))
    mean_abs = mean_abs.to(device)
    alphas = alpha_grid(grid)

    def error(i: int) -> float:
        s = awq_scales(mean_abs, alphas[i])
        err = 0.0
        for local, linear in zip(group.consumer_names, group.consumers):
            args = _weight_args(ctx, local)
            if args is not None:
                fake_quant = weight_quantizer(ctx, args, ctx.prefix + local)
                err += output_error(scaled_quant_delta(linear.weight, s, fake_quant), basis)
        return err

    best, best_error, _ = coarse_to_fine_argmin(grid, error, coarse=grid if full else 5)  # coarse=grid: every α
    if best_error != best_error:  # NaN: every candidate tried overflowed
        raise AlgorithmError(f"awq: the quantized error of {ctx.prefix}{group.label} is NaN; check the weights and "
                             "calibration inputs for overflow")
    log.debug("awq %s%s: alpha=%.2f", ctx.prefix, group.label, alphas[best])
    return alphas[best], awq_scales(mean_abs, alphas[best])


def clip_consumers(group: SmoothGroup, rows: torch.Tensor, ctx: LayerContext) -> None:
    """Clip each quantized consumer's weight ranges where that lowers its quantized output error on `rows`."""
    for local, linear in zip(group.consumer_names, group.consumers):
        args = _weight_args(ctx, local)
        if args is None or local.rsplit(".", 1)[-1] in NOT_CLIPPED:
            continue
        x = rows.to(linear.weight.device).float()
        clipped, _ = clip_by_output_error(linear.weight, x.T @ x, args, weight_quantizer(ctx, args, ctx.prefix + local))
        linear.weight.data.copy_(clipped)


def weight_quantizer(ctx: LayerContext, args, name: str):
    """Fake quantization with the run's observer and the backend's scale rounding — what the codes will be."""
    def fq(w: torch.Tensor) -> torch.Tensor:
        scale, zero_point = observed_qparams(name, w, args, ctx)
        return fake_quantize(w, scale, zero_point, args)
    return fq


@hookimpl
def register_algorithms(register):
    register("awq", ActivationAwareScaling)
