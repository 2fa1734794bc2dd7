"""`percentile`: clip the range to the lower / upper percentiles, trading rare outliers for resolution."""

import math

import torch

from hfquant import Observer, hookimpl


def _kth(t: torch.Tensor, percent: float) -> torch.Tensor:
    """The value at `percent` along the last dim (nearest rank, keepdim), exact and memory-light."""
    n = t.shape[-1]
    k = min(n, max(1, math.ceil(percent / 100.0 * n)))
    return t.kthvalue(k, dim=-1, keepdim=True).values


class PercentileObserver(Observer):
    """Range = [lower-th, upper-th] percentile of each slice; batches are averaged (bounded memory)."""

    options = ("lower", "upper")

    def __init__(self, args, lower: float = 0.1, upper: float = 99.9, **options) -> None:
        super().__init__(args, **options)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentile needs 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.lower, self.upper = lower, upper

    def reduce_batch(self, x):
        lo = self.reduce(x, lambda t: _kth(t, self.lower))
        hi = self.reduce(x, lambda t: _kth(t, self.upper))
        return lo, hi

    combine = Observer.running_average


@hookimpl
def register_observers(register):
    register("percentile", PercentileObserver)
