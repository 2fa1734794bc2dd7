"""`hqq`: data-free error minimisation of each group's scale and zero point (work in progress stub)."""

from __future__ import annotations

from hfquant import hookimpl
from hfquant.algorithm import LayerContext


class Hqq:
    requires_data = False
    produces_codes = True

    def __init__(self) -> None:
        pass

    def start_layer(self, ctx: LayerContext) -> None:
        pass

    def finish_layer(self, ctx: LayerContext) -> None:
        pass  # stub: targets left without codes get round-to-nearest from the driver


@hookimpl
def register_algorithms(register):
    register("hqq", Hqq)
