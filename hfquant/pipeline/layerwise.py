"""The layer-by-layer driver: every algorithm of a run, one decoder layer at a time, codes computed once.

For each decoder layer, in two phases — the weight editors (AWQ, SmoothQuant), then the code producer, each with
its own calibration pass so the producer sees the edited layer (one shared pass when the editors only rescale
inputs and the producer rescales its statistics to match, as AWQ / SmoothQuant and GPTQ do): `start_layer` → the captured calibration inputs
run through the layer (only when an algorithm of the phase `requires_data`) → `finish_layer`, in configured
order → targets still without codes get round-to-nearest → the reported error of exactly those codes is accumulated → the layer runs again
with its quantized weights (or float ones, `propagate="float"`) so the next layer sees what it will see at
inference. When an algorithm `wants_float_outputs`, a second stream — the float model's own hidden states — is carried
alongside, and each layer's untouched float outputs on it are handed over as `ctx.float_outputs`. Both pipelines call `quantize_layer`; they differ only in how a layer's weights become available
(the model in memory, or tensors read from the checkpoint — `sequential.py`) and a data-free run needs no layer
at all (`quantize_module`, used tensor by tensor by the streaming writer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..algorithm import Algorithm, AlgorithmError, LayerContext
from ..plan import ModulePlan, QuantPlan
from ..quant import dequantize
from .quantize import error_stats

log = logging.getLogger("hfquant")

PROPAGATION = ("quantized", "float")
Captured = List[Tuple[torch.Tensor, dict]]  # per calibration window: (hidden states, the layer's keyword inputs)


@dataclass
class AlgorithmChain:
    """The run's algorithms in order (a code producer last; `rtn` appended when none was asked for)."""

    steps: List[Tuple[str, Algorithm]]
    propagate: str = "quantized"
    error: float = 0.0
    energy: float = 0.0
    handled: Dict[str, str] = field(default_factory=dict)  # module → the algorithm that chose its codes
    #: the float model's own hidden states at the next layer (kept only while an algorithm `wants_float_outputs`;
    #: None before the first layer, where both streams are the captured inputs)
    float_inputs: Optional[Captured] = field(default=None, repr=False)

    @property
    def requires_data(self) -> bool:
        return any(getattr(a, "requires_data", False) for _, a in self.steps)

    @property
    def wants_float_outputs(self) -> bool:
        return any(getattr(a, "wants_float_outputs", False) for _, a in self.steps)

    @property
    def edits_weights(self) -> bool:
        return any(not getattr(a, "produces_codes", False) for _, a in self.steps)

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self.steps]

    def stats(self) -> dict:
        """Relative MSE / SQNR of the saved codes against the weights they replaced (after any weight edits)."""
        return error_stats(self.error, self.energy)


def make_chain(algorithms: Dict[str, dict], propagate: str = "quantized", registry=None) -> AlgorithmChain:
    """Instantiate `{name: options}` in order; a chain without a code producer gets `rtn` at the end."""
    from ..plugins import registries

    registry = registry or registries().algorithms
    steps = [(name, registry.get(name)(**(options or {}))) for name, options in algorithms.items()]
    if not steps or not getattr(steps[-1][1], "produces_codes", False):
        steps.append(("rtn", registry.get("rtn")()))
    return AlgorithmChain(steps, propagate)


def changed_options(algorithms: dict) -> dict:
    """{algorithm: its options that differ from the algorithm's own defaults}: what the card names and a resume must
    match — the same whether an option came from a named config group (which lists every default) or from auto."""
    import inspect

    from ..plugins import registries

    changed = {}
    for name, options in algorithms.items():
        defaults = {k: p.default for k, p in inspect.signature(registries().algorithms.get(name)).parameters.items()}
        own = {k: v for k, v in options.items() if defaults.get(k, inspect.Parameter.empty) != v}
        if own:
            changed[name] = own
    return changed


def check_layers(chain: AlgorithmChain, model: torch.nn.Module, drop_unsupported: bool = False) -> List[str]:
    """Let each algorithm with a `check_layer(layer, prefix)` refuse the model from its decoder layers (all of them:
    a model may switch layouts, e.g. dense first layers then MoE) — before any evaluation or calibration, instead
    of when the driver reaches the layer (an optional Algorithm attribute)."""
    from .sequential import decoder_layers
    from .streaming import StreamingError

    if not any(hasattr(a, "check_layer") for _, a in chain.steps):
        return []
    try:
        name, layers = decoder_layers(model)
    except StreamingError:
        return []  # no repeated decoder blocks: the driver finishes the targets as one group, nothing to fold into
    dropped = []
    for index, layer in enumerate(layers):
        dropped += check_layer_support(chain, layer, f"{name}.{index}.", drop_unsupported)
    return dropped


def check_layer_support(chain: AlgorithmChain, layer: torch.nn.Module, prefix: str, drop_unsupported: bool) -> List[str]:
    """Run the chain's `check_layer`s on a decoder layer. A refusal is raised — or, with `drop_unsupported` (the
    recipe was chosen by algorithm=auto), that algorithm leaves the chain and its refusal is returned."""
    dropped = []
    for step in list(chain.steps):
        check = getattr(step[1], "check_layer", None)
        if check is None:
            continue
        try:
            check(layer, prefix)
        except AlgorithmError as exc:
            if not drop_unsupported:
                raise
            chain.steps.remove(step)
            dropped.append(f"{step[0]} dropped: {exc}")
            log.info("algorithm=auto: %s", dropped[-1])
    return dropped


def quantize_layer(chain: AlgorithmChain, ctx: LayerContext, inputs: Optional[Captured], last: bool = False) -> Optional[Captured]:
    """Run every algorithm on one layer; set each target's codes; return the inputs of the next layer.

    Weight editors run first, as one phase; the code producer then gets its own calibration pass, so its
    statistics (a GPTQ Hessian) describe the edited layer it actually quantizes."""
    ctx.inputs = inputs
    with torch.no_grad():
        if inputs is not None and ctx.layer is not None and chain.wants_float_outputs:
            _follow_float_model(chain, ctx, inputs, last)
        for phase in _phases(chain.steps):
            for _, algorithm in phase:
                algorithm.start_layer(ctx)
            try:
                if inputs is not None and ctx.layer is not None and any(getattr(a, "requires_data", False) for _, a in phase):
                    ctx.input_scaling.clear()  # the scaling recorded is relative to the latest pass
                    for hidden, kwargs in inputs:
                        ctx.layer(hidden, **kwargs)
            finally:
                ctx.remove_hooks()
            for name, algorithm in phase:
                missing = [n for n, mp in ctx.plans.items() if mp.weight_args is not None and mp.weight_codes is None]
                algorithm.finish_layer(ctx)
                for n in missing:
                    if ctx.plans[n].weight_codes is not None:
                        chain.handled[n] = name
        ctx.float_outputs = None  # the float stream (if any) holds what the next layer needs
        propagate = inputs is not None and ctx.layer is not None and not last
        _account_codes(chain, ctx, write_back=propagate and chain.propagate == "quantized")
        if not propagate:
            return None
        return [(layer_output(ctx.layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]


def _follow_float_model(chain: AlgorithmChain, ctx: LayerContext, inputs: Captured, last: bool) -> None:
    """The untouched float layer on the float model's own hidden states (`ctx.float_outputs`), before any algorithm
    edits it; they are also the float stream's inputs of the next layer. One more forward pass per window (signround
    skips its own target pass in exchange), and
    one more set of hidden states held through the run (three sets at the peak of a layer's pass instead of two) — only
    for an algorithm that asks (signround's `targets="float_model"`); with float propagation the run's own stream is
    the float model's and nothing extra is held."""
    carried = chain.propagate != "float"  # with float propagation the run's own stream is the float model's
    own = chain.float_inputs if carried and chain.float_inputs is not None else inputs
    ctx.float_outputs = [layer_output(ctx.layer(hidden, **kwargs)) for hidden, kwargs in own]
    if carried:
        chain.float_inputs = None if last else [(out, kwargs) for out, (_, kwargs) in zip(ctx.float_outputs, own)]


def _phases(steps):
    """[weight editors…], [code producer]: each phase gets its own calibration pass — or one phase for all when
    the editors only rescale inputs and the producer can rescale its statistics to match (exact up to float
    rounding, and one forward pass of every calibration window per layer cheaper)."""
    editors = [s for s in steps if not getattr(s[1], "produces_codes", False)]
    producers = [s for s in steps if getattr(s[1], "produces_codes", False)]
    if editors and producers and all(getattr(a, "rescales_inputs_only", False) for _, a in editors) and all(
            getattr(a, "accepts_input_rescaling", False) or not getattr(a, "requires_data", False) for _, a in producers):
        return [editors + producers]
    return [p for p in (editors, producers) if p]


def _account_codes(chain: AlgorithmChain, ctx: LayerContext, write_back: bool) -> None:
    """Add each target's code error to the run's total; `write_back` puts the dequantized codes in the live
    weight (quantized propagation: what the next layer must see)."""
    for name, linear in ctx.targets.items():
        mp = ctx.plans[name]
        if mp.weight_args is None:
            continue
        if mp.weight_codes is None:
            raise RuntimeError(f"no algorithm produced codes for {name} (chain: {', '.join(chain.names)})")
        weight = linear.weight.detach()
        if mp.weight_error is not None:  # measured while the codes were chosen
            chain.error += mp.weight_error[0]
            chain.energy += mp.weight_error[1]
            if not write_back:
                continue
        for rows in _row_chunks(weight):  # float32 temporaries of a few MB, not of a whole 11008-wide weight
            scale, zero_point = (_rows_of(p, rows, weight.shape[0]) for p in mp.weight_qparams)
            approx = dequantize(mp.weight_codes[rows], scale, zero_point, mp.weight_args, dtype=torch.float32)
            if mp.weight_error is None:
                exact = weight[rows].float()  # a view of the weight when it is float32: never modified in place
                chain.energy += float(exact.pow(2).sum())
                chain.error += float((approx - exact).pow_(2).sum())
            if write_back:
                linear.weight.data[rows] = approx.to(weight.dtype)


def _row_chunks(weight: torch.Tensor, elements: int = 1 << 22):
    step = max(1, elements // max(1, weight.shape[1]))
    return [slice(i, i + step) for i in range(0, weight.shape[0], step)]


def _rows_of(p: torch.Tensor, rows: slice, out_features: int) -> torch.Tensor:
    """The part of a qparam that belongs to weight rows `rows` (a per-tensor one applies to all of them)."""
    return p[rows] if p.dim() > 0 and p.shape[0] == out_features else p


def layer_output(output):
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


class _ReachedFirstLayer(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


@torch.no_grad()
def capture_first_layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, windows) -> Captured:
    """Each calibration window's hidden states and keyword inputs (positions, masks) at the first decoder layer."""
    captured: Captured = []

    def capture(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _ReachedFirstLayer

    device = next((p.device for p in first_layer.parameters() if p.device.type != "meta"), torch.device("cpu"))
    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for i in range(len(windows)):
            try:
                model(input_ids=windows.input_ids[i : i + 1].to(device), use_cache=False)
            except _ReachedFirstLayer:
                pass
    finally:
        handle.remove()
    return captured


def layer_groups(targets: Dict[str, torch.nn.Module], prefix: str, count: int) -> Tuple[List[List[str]], List[str]]:
    """Target names per decoder layer (index order) and those outside every layer."""
    per_layer: List[List[str]] = [[] for _ in range(count)]
    outside: List[str] = []
    for name in targets:
        head = prefix + "."
        if name.startswith(head):
            index = name[len(head):].split(".", 1)[0]
            if index.isdigit() and int(index) < count:
                per_layer[int(index)].append(name)
                continue
        outside.append(name)
    return per_layer, outside


def context_factory(plan: QuantPlan, make_observer, round_scale, model) -> Callable[..., LayerContext]:
    def make(prefix: str, layer, targets: Dict[str, torch.nn.Module]) -> LayerContext:
        return LayerContext(prefix, layer, targets, {n: plan.modules[n] for n in targets}, plan.scheme, make_observer,
                            round_scale or (lambda s: s), model)
    return make


@torch.no_grad()
def quantize_in_memory(model: torch.nn.Module, plan: QuantPlan, chain: AlgorithmChain, make_observer,
                       round_scale=None, windows=None) -> dict:
    """Codes for every target of `plan` on a model in memory (weights are edited in place by weight editors,
    and replaced by their dequantized codes for quantized propagation). Returns the error of the codes."""
    from .sequential import decoder_layers

    targets = {name: model.get_submodule(name) for name in plan.modules}
    make_ctx = context_factory(plan, make_observer, round_scale, model)
    try:
        prefix, layers = decoder_layers(model)
    except Exception:
        if chain.requires_data:
            raise
        prefix, layers = "", []
    per_layer, outside = layer_groups(targets, prefix, len(layers))
    inputs = None
    if chain.requires_data:
        if windows is None:
            raise ValueError(f"algorithm chain {chain.names} needs calibration data")
        inputs = capture_first_layer_inputs(model, layers[0], windows)
    chain.float_inputs = None  # both streams start at the captured inputs
    for index in tqdm(range(len(layers)), desc="quantize layers", unit="layer", leave=False):
        names = per_layer[index]
        ctx = make_ctx(f"{prefix}.{index}.", layers[index], {n: targets[n] for n in names})
        ctx.num_samples = len(inputs) if inputs is not None else 0
        inputs = quantize_layer(chain, ctx, inputs, last=index == len(layers) - 1)
    if outside:
        _finish_outside(chain, make_ctx, {n: targets[n] for n in outside})
    return chain.stats()


def _finish_outside(chain: AlgorithmChain, make_ctx, targets) -> None:
    """Targets outside the decoder layers (e.g. an lm_head a scheme quantizes): data-free producers only."""
    data_free = AlgorithmChain([(n, a) for n, a in chain.steps if not getattr(a, "requires_data", False)
                                and getattr(a, "produces_codes", False)], chain.propagate)
    if not data_free.steps:
        from ..plugins import registries

        data_free.steps.append(("rtn", registries().algorithms.get("rtn")()))
    log.info("%d target(s) outside the decoder layers get %s (no calibration inputs there)", len(targets), data_free.names[-1])
    quantize_layer(data_free, make_ctx("", None, targets), None)
    chain.error += data_free.error
    chain.energy += data_free.energy
    chain.handled.update(data_free.handled)


def quantize_module(chain: AlgorithmChain, mp: ModulePlan, linear: torch.nn.Linear, scheme, make_observer,
                    round_scale=None) -> None:
    """Codes for one module with nothing else loaded (data-free chains; the streaming writer's unit of work)."""
    plan = QuantPlan(scheme, "", {}, {mp.name: mp})
    quantize_layer(chain, context_factory(plan, make_observer, round_scale, None)("", None, {mp.name: linear}), None)
