"""`smoothquant`: migrate activation outliers into the weights before w8a8 quantization.

Per-token int8 activations lose the small channels when a few channels are huge. SmoothQuant divides each
input channel by s_j = max|X_j|^α / max|W_j|^(1−α) (folded into the preceding norm, so the model keeps its
architecture) and multiplies the weight columns by s_j: the activation ranges shrink, the weights absorb
them, and the float function is unchanged. α (default 0.5) sets how much moves. Edits weights only; a code
producer (rtn, gptq) runs after it. After Xiao et al., "SmoothQuant" (2022).
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch

from hfquant import hookimpl
from hfquant.algorithm import LayerContext
from hfquant.quant.smoothing import column_max_abs, smoothquant_scales
from hfquant.smoothing import SmoothGroup, check_feeds, find_groups, fold, hook_groups

log = logging.getLogger("hfquant")
OPTIONS = ("alpha", "linear_pairs")


class SmoothQuant:
    requires_data = True
    produces_codes = False

    def __init__(self, *, alpha: float = 0.5, linear_pairs: bool = False, **unknown) -> None:
        if unknown:
            raise TypeError(f"smoothquant got unknown option(s) {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
        self.alpha, self.linear_pairs = float(alpha), bool(linear_pairs)
        self._groups: List[SmoothGroup] = []
        self._stats: Dict = {}

    def start_layer(self, ctx: LayerContext) -> None:
        self._groups, self._stats = [], {}
        if ctx.layer is None or not ctx.prefix:  # targets outside the decoder layers: nothing to fold into
            return
        groups = find_groups(ctx.layer, "smoothquant", self.linear_pairs, ctx.prefix)
        self._groups = [g for g in groups if _quantized(g, ctx)]
        self._stats = hook_groups(ctx, self._groups)

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        try:
            for group in self._groups:
                first, inputs = self._stats[group.source_name]
                check_feeds(group, first, inputs, ctx.layer, "smoothquant", ctx.prefix)
            for group in reversed(self._groups):
                inputs = self._stats[group.source_name][1]
                if inputs.count == 0:
                    log.warning("smoothquant: no calibration input reached %s%s; left unscaled", ctx.prefix,
                                group.consumer_names[0])
                    continue
                weight_max = column_max_abs([linear.weight for linear in group.consumers])
                fold(group, smoothquant_scales(inputs.max_abs.to(weight_max.device), weight_max, self.alpha))
        finally:
            self._groups, self._stats = [], {}


def _quantized(group: SmoothGroup, ctx: LayerContext) -> bool:
    """Whether a consumer is quantized at all (weights or input activations)."""
    plans = [ctx.plans.get(ctx.prefix + name) for name in group.consumer_names]
    return any(p is not None and (p.weight_args is not None or p.input_args is not None) for p in plans)


@hookimpl
def register_algorithms(register):
    register("smoothquant", SmoothQuant)
