"""`minmax`: the exact observed range (running min / max over batches). Cheap and outlier-sensitive."""

from hfquant import Observer, hookimpl


class MinMaxObserver(Observer):
    """Running min / max; qparams cover every value ever observed."""


@hookimpl
def register_observers(register):
    register("minmax", MinMaxObserver)
