"""Example hfquant plugin: the `sigma` observer clips each slice's range to mean ± k standard deviations.

Install it (`pip install ./examples/hfquant-example-plugin`) and `hfquant plugins` lists it; then
`hfquant observer=sigma` uses it. Nothing in hfquant changes.
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
