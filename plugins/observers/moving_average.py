"""`moving-average`: exponential moving average of per-batch min / max, damping rare activation spikes."""

from hfquant import Observer, hookimpl


class MovingAverageObserver(Observer):
    """range ← momentum · range + (1 − momentum) · batch range; the first batch initialises it.

    On a single tensor (a weight) it equals `minmax`.
    """

    options = ("momentum",)

    def __init__(self, args, momentum: float = 0.9, **options) -> None:
        super().__init__(args, **options)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"moving-average momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def combine(self, lo, hi):
        m = self.momentum
        return m * self.min_vals + (1 - m) * lo, m * self.max_vals + (1 - m) * hi


@hookimpl
def register_observers(register):
    register("moving-average", MovingAverageObserver)
