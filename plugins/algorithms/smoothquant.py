"""`smoothquant`: migrate activation outliers into the weights before w8a8 quantization.

Per-token int8 activations lose the small channels when a few channels are huge. SmoothQuant divides each
input channel by s_j = max|X_j|^α / max|W_j|^(1−α) (folded into the preceding norm, so the model keeps its
architecture) and multiplies the weight columns by s_j: the activation ranges shrink, the weights absorb
them, and the float function is unchanged. α (default 0.5) sets how much moves. Edits weights only; a code
producer (rtn, gptq) runs after it. After Xiao et al., "SmoothQuant" (2022).
"""

from __future__ import annotations

import torch

from hfquant import hookimpl
from hfquant.algorithm import LayerContext
from hfquant.quant.smoothing import column_max_abs, smoothquant_scales
from hfquant.smoothing import LayerGroups, SmoothGroup, fold

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
        self._layer = LayerGroups("smoothquant", self.linear_pairs, _quantized)

    def start_layer(self, ctx: LayerContext) -> None:
        self._layer.start(ctx)

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        for group, inputs in self._layer.walk(ctx):
            weight_max = column_max_abs([linear.weight for linear in group.consumers])
            fold(group, smoothquant_scales(inputs.max_abs.to(weight_max.device), weight_max, self.alpha))

def _quantized(group: SmoothGroup, ctx: LayerContext) -> bool:
    """Whether a consumer is quantized at all (weights or input activations)."""
    plans = [ctx.plans.get(ctx.prefix + name) for name in group.consumer_names]
    return any(p is not None and (p.weight_args is not None or p.input_args is not None) for p in plans)


@hookimpl
def register_algorithms(register):
    register("smoothquant", SmoothQuant)
