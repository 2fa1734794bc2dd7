"""`signround`: codes whose rounding is learnt on the layer's output (SignRound, the method behind AutoRound).

Per decoder layer: the float model's own outputs at this layer are the target (`targets=float_model`, the default:
the driver carries the float model's hidden states alongside the quantized ones, so the codes also correct the drift
of the layers before; `float_layer`: the float layer on the quantized inputs); every quantized target
starts at round-to-nearest with the run's observer and learns a rounding offset per weight and a range shrink per
scale by signed gradient descent on the squared error between the fake-quantized layer's output and that
target (`hfquant.quant.signround`). The offsets that gave the lowest loss are kept; the stored scales are the
backend's rounding of the learnt ones, so the saved codes and scales are plain groups every format stores.

GPTQ compensates each rounding error with linear algebra on one Linear's inputs; SignRound sees the whole layer —
attention's softmax and the MLP's gate included — at the cost of a forward and a backward pass per step.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List

import torch
from torch.func import functional_call

from hfquant import hookimpl
from hfquant.algorithm import AlgorithmError, LayerContext
from hfquant.pipeline.layerwise import layer_output
from hfquant.quant.signround import RoundingState
from hfquant_builtins.algorithms.rtn import observed_qparams

log = logging.getLogger("hfquant")
OPTIONS = ("iters", "lr", "batch_size", "min_shrink", "seed", "targets", "learn_zero_point")
TARGETS = ("float_model", "float_layer")


def _without_cache(kwargs: dict) -> dict:
    """A KV cache among a layer's inputs would grow with every step (and keep each step's graph alive): None."""
    from transformers.cache_utils import Cache

    return {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}


def _per_window(value) -> bool:
    """Whether every tensor among a window's keyword inputs has a batch dimension of 1 (positions, masks, rotary
    tables), so a stack of windows broadcasts against it; a tensor folded with the batch (e.g. an ALiBi bias of
    (batch·heads, …)) makes the windows run one by one."""
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1 or value.shape[0] == 1
    if isinstance(value, (tuple, list)):
        return all(_per_window(v) for v in value)
    if isinstance(value, dict):
        return all(_per_window(v) for v in value.values())
    return True


def _same(a, b) -> bool:
    """Whether two windows' keyword inputs are identical (tensors by value), so one batch can serve both."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and type(a) in (bool, int, float, str) and a == b)


class SignRound:
    """Signed gradient descent on rounding offsets and range shrinks, layer by layer."""

    requires_data = True
    produces_codes = True
    # it learns on the live layer in finish_layer and gathers nothing in the calibration pass, so input rescaling
    # by a weight editor in the same pass (AWQ) needs no correction
    accepts_input_rescaling = True

    def __init__(self, iters: int = 50, lr: float = None, batch_size: int = 4, min_shrink: float = 0.5, seed: int = 0,
                 targets: str = "float_model", learn_zero_point: bool = False, **unknown) -> None:
        if unknown:
            raise TypeError(f"signround got unknown option(s) {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
        for name, value in (("iters", iters), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AlgorithmError(f"signround: {name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise AlgorithmError(f"signround: seed must be an integer, got {seed!r}")
        if lr is None:
            lr = 1.0 / iters  # AutoRound's default: the offsets can cross their whole range once over the run
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise AlgorithmError(f"signround: lr must be a positive number (default 1/iters), got {lr!r}")
        if isinstance(min_shrink, bool) or not isinstance(min_shrink, (int, float)) or not 0 < min_shrink <= 1:
            raise AlgorithmError(f"signround: min_shrink must be in (0, 1] (1 keeps the observer's ranges), got "
                                 f"{min_shrink!r}")
        if targets not in TARGETS:
            raise AlgorithmError(f"signround: targets must be one of {', '.join(TARGETS)}, got {targets!r} "
                                 "(float_model: the float model's own outputs at this layer; float_layer: the float "
                                 "layer on the inputs the quantized layers before it give)")
        #: float_model: the driver carries the float model's hidden states too, and the target is what the float
        #: model computes here — the learnt codes also correct the drift of the layers before (AutoRound's default)
        self.targets = targets
        if not isinstance(learn_zero_point, bool):
            raise AlgorithmError(f"signround: learn_zero_point must be true or false, got {learn_zero_point!r}")
        #: asymmetric schemes: the lower and upper ends of each range shrink separately, so the zero point moves
        #: (AutoRound's rule); a symmetric scheme, whose zero point is fixed, is refused at config time (`problem`)
        self.learn_zero_point = learn_zero_point
        self.iters, self.lr, self.batch_size = iters, float(lr), batch_size
        self.min_shrink, self.seed = float(min_shrink), seed
        #: layer prefix → (output error against the targets at round-to-nearest, the lowest reached): for logs and
        #: benchmarks (with targets=float_model it includes the drift of the layers before, so the two settings'
        #: numbers do not compare)
        self.losses: Dict[str, tuple] = {}

    @property
    def wants_float_outputs(self) -> bool:
        """Asks the driver for `ctx.float_outputs` (see `hfquant.algorithm.OPTIONAL_ATTRIBUTES`)."""
        return self.targets == "float_model"

    def problem(self, scheme) -> str:
        """Config time: options that cannot apply to `scheme` (see `hfquant.algorithm.OPTIONAL_ATTRIBUTES`)."""
        weights = getattr(scheme, "weights", None)
        if self.learn_zero_point and weights is not None and weights.symmetric:
            return (f"learn_zero_point needs an asymmetric scheme (scheme {scheme.name!r} is symmetric: its zero point "
                    "is fixed); use e.g. scheme=w4a16-asym, or drop learn_zero_point")
        return ""

    def start_layer(self, ctx: LayerContext) -> None:
        pass

    def finish_layer(self, ctx: LayerContext) -> None:
        names = [n for n, mp in ctx.plans.items() if mp.weight_args is not None and mp.weight_codes is None]
        if not names:
            return
        if ctx.layer is None or not ctx.inputs:
            raise AlgorithmError(f"signround: {', '.join(names)} have no calibration inputs (targets outside the "
                                 "decoder layers, or a data-free run); exclude them from the scheme or use gptq/rtn")
        states, zero_points = {}, {}
        with torch.no_grad():
            for name in names:
                weight = ctx.targets[name].weight.detach()
                scale, zero_points[name] = observed_qparams(name, weight, ctx.plans[name].weight_args, ctx)
                states[name] = RoundingState.start(weight, scale, zero_points[name], ctx.plans[name].weight_args,
                                                   ctx.round_scale, self.learn_zero_point)
            inputs = [(hidden, _without_cache(kwargs)) for hidden, kwargs in ctx.inputs]
            if self.wants_float_outputs:
                if ctx.float_outputs is None:
                    raise AlgorithmError("signround: targets=float_model needs a driver that sets ctx.float_outputs")
                targets = ctx.float_outputs
            else:
                targets = [layer_output(ctx.layer(hidden, **kwargs)) for hidden, kwargs in inputs]
        best = self._learn(ctx, states, inputs, targets)
        with torch.no_grad():
            for name, state in states.items():
                state.restore(best[name])
                ctx.plans[name].weight_qparams = (state.stored_scale(),
                                                  state.stored_zero_point().to(zero_points[name].dtype))
                ctx.plans[name].weight_codes = state.codes()

    def _learn(self, ctx: LayerContext, states: Dict[str, RoundingState], inputs, targets: List[torch.Tensor]):
        local = {name: ctx.local_name(name) + ".weight" for name in states}
        # windows of one length with the same positions and masks run as one batch (fewer, larger matrix products)
        stackable = all(h.shape == inputs[0][0].shape and _same(kw, inputs[0][1]) for h, kw in inputs) and _per_window(
            inputs[0][1])
        generator = torch.Generator().manual_seed(self.seed)
        order: List[int] = []
        best_loss, best = math.inf, {n: s.snapshot() for n, s in states.items()}
        first_loss = None
        for step in range(self.iters):
            if len(order) < self.batch_size:
                order += torch.randperm(len(targets), generator=generator).tolist()
            batch, order = order[: self.batch_size], order[self.batch_size:]
            learnable = [p for state in states.values() for p in state.parameters()]
            with torch.enable_grad():
                # in the layer's own dtype (a bf16 model runs its forward in bf16; the offsets stay float32)
                weights = {local[n]: s.fake_quantized().to(ctx.targets[n].weight.dtype) for n, s in states.items()}
                loss_value = 0.0
                chunks = [batch] if stackable else [[i] for i in batch]
                for position, chunk in enumerate(chunks):
                    hidden = torch.cat([inputs[i][0] for i in chunk])
                    out = layer_output(functional_call(ctx.layer, weights, (hidden,), inputs[chunk[0]][1], strict=False))
                    target = torch.cat([targets[i] for i in chunk])
                    # a sum, not a mean: only the gradient's sign is used, and 2·diff/N would underflow to zero in
                    # an fp16 layer's backward for realistic N (nothing would move)
                    squared = (out.float() - target.float()).pow(2).sum()
                    # gradients only into the offsets and shrinks (never into the model's own parameters)
                    squared.backward(inputs=learnable, retain_graph=position < len(chunks) - 1)
                    loss_value += float(squared.detach()) / (out.numel() * len(chunks))
            if first_loss is None:
                first_loss = loss_value
            if loss_value < best_loss:  # judged on this step's windows, as AutoRound does
                best_loss, best = loss_value, {n: s.snapshot() for n, s in states.items()}
            lr = self.lr * (1.0 - step / self.iters)  # linear decay to zero
            for state in states.values():
                state.signed_step(lr, self.min_shrink)
        self.losses[ctx.prefix] = (first_loss, best_loss)
        log.debug("signround %s: output error against the %s targets %.4g at round-to-nearest, %.4g learnt",
                  ctx.prefix, self.targets, first_loss, best_loss)
        return best


@hookimpl
def register_algorithms(register):
    register("signround", SignRound)
