"""`mse`: search a clipping ratio per slice that minimises the quantization error ‖x − x̂‖_p.

Shrinks the observed range by 1%, 2%, … up to `max_shrink` and keeps, per slice, the range with the least
error (early stop after `patience` steps without improvement), as in llm-compressor's MSE observer.
"""

import torch

from hfquant import Observer, hookimpl
from hfquant.quant import compute_qparams, fake_quantize


class MSEObserver(Observer):
    """Per batch: the error-minimising clipped range; across batches: their running average."""

    options = ("grid", "max_shrink", "patience", "norm")

    def __init__(self, args, grid: int = 100, max_shrink: float = 0.2, patience: int = 5, norm: float = 2.4, **options):
        super().__init__(args, **options)
        if grid < 1 or not 0.0 < max_shrink < 1.0 or patience < 1 or norm <= 0:
            raise ValueError(
                f"mse needs grid >= 1, 0 < max_shrink < 1, patience >= 1, norm > 0; got grid={grid}, "
                f"max_shrink={max_shrink}, patience={patience}, norm={norm}"
            )
        self.grid, self.max_shrink, self.patience, self.norm = grid, max_shrink, patience, norm

    def reduce_batch(self, x):
        lo0, hi0 = super().reduce_batch(x)
        best_lo, best_hi = lo0.clone(), hi0.clone()
        best_err = torch.full_like(lo0, float("inf"))
        stale = 0
        steps = int(self.max_shrink * self.grid)
        for i in range(steps + 1):
            p = 1.0 - i / self.grid
            lo, hi = lo0 * p, hi0 * p
            scale, zp = compute_qparams(lo, hi, self.args)
            err = self.reduce((fake_quantize(x, scale, zp, self.args) - x).abs_().pow_(self.norm), lambda t: t.sum(-1, keepdim=True))
            better = err < best_err
            if bool(better.any()):
                best_err = torch.where(better, err, best_err)
                best_lo = torch.where(better, lo, best_lo)
                best_hi = torch.where(better, hi, best_hi)
                stale = 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        return best_lo, best_hi

    combine = Observer.running_average


@hookimpl
def register_observers(register):
    register("mse", MSEObserver)
