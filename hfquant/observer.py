"""The `Observer` base class: turns observed tensors (weights, or activations batch by batch) into qparams.

Contract for plugins: ``Observer(args, **options)``, ``observe(tensor)`` any number of times (memory stays
bounded: keep reduced statistics, never the tensors), ``qparams() -> (scale, zero_point)`` shaped for
``args.strategy``. Subclasses usually implement only `reduce_batch` (statistics of one tensor) and
optionally `combine` (how statistics of successive batches merge).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .quant import native
from .quant.args import QuantArgs
from .quant.qparams import check_finite, compute_qparams, reduce_by_strategy


class Observer:
    """Running (min, max) per slice that shares a scale; subclasses change how each batch is reduced/merged."""

    #: option names accepted by the constructor (checked so that typos fail loudly)
    options: Tuple[str, ...] = ()

    def __init__(self, args: QuantArgs, **options) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {sorted(unknown)}; allowed: {allowed}"
            )
        self.args = args
        self.min_vals: Optional[torch.Tensor] = None
        self.max_vals: Optional[torch.Tensor] = None
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        """Fold one tensor (a weight, or one calibration batch of an activation) into the statistics."""
        x = x.detach()
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        if type(self).reduce_batch is Observer.reduce_batch and x.dtype.is_floating_point:
            # Plain min / max are exact in any float dtype: reduce a bf16 weight as it is, convert the result.
            # They propagate NaN and show ±Inf, so checking them checks every element.
            own_reduce = type(self).reduce is not Observer.reduce  # a subclass that groups differently
            fused = native.min_max(x, self.args) if work == torch.float32 and not own_reduce else None  # one pass
            lo, hi = fused if fused is not None else (t.to(work) for t in self.reduce_batch(x))
            if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
                check_finite(x, "observed tensor")  # raises, counting the bad values
        else:
            check_finite(x, "observed tensor")
            lo, hi = self.reduce_batch(x.to(work))
        if self.min_vals is None:
            self.min_vals, self.max_vals = lo, hi
        else:
            if lo.shape != self.min_vals.shape:
                raise ValueError(
                    f"observed shapes differ between calls ({tuple(lo.shape)} vs {tuple(self.min_vals.shape)}); "
                    "use strategy 'tensor' for activations whose shape varies"
                )
            self.min_vals, self.max_vals = self.combine(lo, hi)
        self.count += 1

    def reduce_batch(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of one tensor for each slice that shares a scale."""
        lo = self.reduce(x, lambda t: t.amin(dim=-1, keepdim=True))
        hi = self.reduce(x, lambda t: t.amax(dim=-1, keepdim=True))
        return lo, hi

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Merge a new batch's statistics into the running ones (default: running min / max)."""
        return torch.minimum(self.min_vals, lo), torch.maximum(self.max_vals, hi)

    def running_average(self, lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A `combine` for observers whose per-batch ranges are estimates: their mean over batches."""
        n = self.count
        return (self.min_vals * n + lo) / (n + 1), (self.max_vals * n + hi) / (n + 1)

    def reduce(self, x: torch.Tensor, reduce_last) -> torch.Tensor:
        """Reduce the slices of `x` that share a scale; activations (…, hidden) are flattened per tensor."""
        return reduce_by_strategy(x, self.args, reduce_last)

    def qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) for everything observed so far."""
        if self.min_vals is None:
            raise RuntimeError(
                f"{type(self).__name__}.qparams() called before observe(): nothing was observed — "
                "check that calibration data reached this module"
            )
        return compute_qparams(self.min_vals, self.max_vals, self.args)
