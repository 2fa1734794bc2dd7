"""Example hfquant plugin: the `sigma` observer clips each slice's range to mean ± k standard deviations, and
the `weighted-clip` algorithm picks each slice's clipping from calibration activations.

Install it (`pip install ./examples/hfquant-example-plugin`) and `hfquant plugins` lists it; then
`hfquant observer=sigma` or `hfquant algorithm=weighted-clip` uses it. Nothing in hfquant changes.
"""

import torch

import hfquant


class SigmaObserver(hfquant.Observer):
    """Range = mean ± k·std of each slice (within the observed min/max); batches are averaged."""

    options = ("k",)

    def __init__(self, args, k: float = 4.0, **options):
        super().__init__(args, **options)
        self.k = k

    def reduce_batch(self, x):
        lo_obs, hi_obs = super().reduce_batch(x)
        mean = self.reduce(x, lambda t: t.mean(-1, keepdim=True))
        std = self.reduce(x, lambda t: t.std(-1, keepdim=True, unbiased=False))
        return torch.maximum(mean - self.k * std, lo_obs), torch.minimum(mean + self.k * std, hi_obs)

    combine = hfquant.Observer.running_average


@hfquant.hookimpl
def register_observers(register):
    register("sigma", SigmaObserver)


class WeightedClip:
    """`weighted-clip`: round-to-nearest whose per-slice range is shrunk (grid of factors) to minimise the error
    weighted by each input channel's mean squared activation — the diagonal of GPTQ's Hessian, so it needs
    calibration data but no matrix inverse. Shows both halves of the Algorithm protocol: hooks that
    accumulate statistics in `start_layer`, codes chosen in `finish_layer`."""

    requires_data = True
    produces_codes = True

    def __init__(self, grid: int = 10, min_factor: float = 0.7):
        if grid < 1 or not 0 < min_factor <= 1:
            raise ValueError("grid must be >= 1 and 0 < min_factor <= 1")
        self.grid, self.min_factor = grid, min_factor
        self.energy = {}

    def start_layer(self, ctx):
        self.energy = {}
        for name, linear in ctx.targets.items():
            ctx.hook(linear, lambda _m, x, name=name: self._observe(name, x))

    def _observe(self, name, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        total, count = self.energy.get(name, (0.0, 0))
        self.energy[name] = (total + x.pow(2).sum(0), count + x.shape[0])

    @torch.no_grad()
    def finish_layer(self, ctx):
        for name, linear in ctx.targets.items():
            mp = ctx.plans[name]
            if mp.weight_args is None or mp.weight_codes is not None:
                continue
            total, count = self.energy.pop(name)
            importance = total / count  # (in,)
            weight = linear.weight.detach().float()
            observer = ctx.make_observer(mp.weight_args)
            observer.observe(weight)
            best = None
            for step in range(self.grid):
                factor = 1.0 - (1.0 - self.min_factor) * step / max(1, self.grid - 1)
                lo, hi = observer.min_vals * factor, observer.max_vals * factor
                scale, zero_point = hfquant.compute_qparams(lo, hi, mp.weight_args)
                scale = ctx.round_scale(scale)
                codes = hfquant.quantize(weight, scale, zero_point, mp.weight_args)
                error = ((hfquant.dequantize(codes, scale, zero_point, mp.weight_args) - weight).pow(2) * importance).sum()
                if best is None or error < best[0]:
                    best = (error, (scale, zero_point), codes)
            mp.weight_qparams, mp.weight_codes = best[1], best[2]


@hfquant.hookimpl
def register_algorithms(register):
    register("weighted-clip", WeightedClip)
