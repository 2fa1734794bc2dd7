"""The `Algorithm` protocol: what chooses each target's integer codes (and may edit weights first).

The layer-by-layer driver (`hfquant.pipeline.layerwise`) calls, for every decoder layer in order, steps 1–3
once for the weight editors and once more for the code producer (so a producer's statistics describe the
layer as the editors left it) — or once for all of them, when the editors only rescale inputs and the
producer can rescale its statistics to match (see `OPTIONAL_ATTRIBUTES`; AWQ, SmoothQuant and GPTQ do):

1. ``start_layer(ctx)`` on every algorithm of the run, in the configured order — install forward hooks with
   ``ctx.hook(module, fn)`` to accumulate statistics (the driver removes them);
2. one forward pass of the captured calibration inputs through the layer (skipped when no algorithm of the
   run ``requires_data``);
3. ``finish_layer(ctx)`` on every algorithm, in order. Weight-editing algorithms (AWQ, SmoothQuant) change
   ``ctx.targets[...].weight`` and the preceding norm / Linear in place; a code-producing algorithm
   (``produces_codes = True``: rtn, gptq, hqq) sets ``ctx.plans[name].weight_qparams`` and
   ``ctx.plans[name].weight_codes`` for every target it handles, with scales passed through
   ``ctx.round_scale`` *before* the codes are computed (the saved scales are exactly those used).
   A target left without codes gets round-to-nearest from the configured observer.
4. The layer runs again on the same inputs with the quantized weights (or the float ones, when
   ``propagate=float``) to produce the next layer's inputs.

Targets outside the decoder layers (rare: most schemes ignore ``lm_head``) are finished as one extra group
without data. A data-free run (no algorithm ``requires_data``) never runs a forward pass, which lets the
streaming pipeline give each module its own context read straight from the checkpoint (``ctx.layer`` is
then None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch

from .errors import HfquantError
from .observer import Observer
from .plan import ModulePlan
from .quant import QuantArgs
from .scheme import QuantScheme


@dataclass
class LayerContext:
    """One decoder layer (or a group of targets) as the algorithms see it."""

    prefix: str  # "model.layers.3." — every target name starts with it ("" for targets outside the layers)
    layer: Optional[torch.nn.Module]  # the decoder block, weights loaded; None in data-free streaming
    targets: Dict[str, torch.nn.Linear]  # full module name → live Linear (float weights, editable in place)
    plans: Dict[str, ModulePlan]  # full module name → its plan; code producers fill qparams and codes
    scheme: QuantScheme
    make_observer: Callable[[QuantArgs], Observer]  # the run's observer (name + options) for these args
    round_scale: Callable[[torch.Tensor], torch.Tensor] = lambda s: s  # the backend's scale rounding
    model: Optional[torch.nn.Module] = None  # the whole model (config, structure); may hold meta weights
    num_samples: int = 0  # calibration windows that will pass through `layer` (0 when data-free)
    #: full target name → per-input-channel factor its input was multiplied by since this layer's calibration
    #: pass (weight editors that only rescale inputs record it, see `scale_inputs`)
    input_scaling: Dict[str, torch.Tensor] = field(default_factory=dict)
    #: the calibration inputs of `layer`, (hidden states, keyword inputs) per window — for an algorithm that needs
    #: more passes of its own (gptq's `sequential`); None when data-free
    inputs: Optional[List[Tuple[torch.Tensor, dict]]] = None
    #: the float layer's outputs on the float model's own hidden states, per window, computed before any algorithm
    #: touched the layer — set only when an algorithm of the run has `wants_float_outputs = True` (its targets
    #: then include the drift of the quantized layers before this one); None otherwise
    float_outputs: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    _handles: List = field(default_factory=list, repr=False)

    def hook(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, torch.Tensor], None]) -> None:
        """Call ``fn(module, input)`` with `module`'s first positional input on every forward of this layer's
        calibration pass; the driver removes the hook after the pass."""
        self._handles.append(module.register_forward_pre_hook(lambda m, args: fn(m, args[0])))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def scale_inputs(self, names, factor: torch.Tensor) -> None:
        """Record that the inputs of targets `names` are now multiplied by `factor` (per input channel) compared
        with what the calibration pass saw — so a code producer that shared the pass can rescale its statistics."""
        for name in names:
            old = self.input_scaling.get(name)
            self.input_scaling[name] = factor.detach().float() if old is None else old * factor.detach().float()

    def local_name(self, full_name: str) -> str:
        """`model.layers.3.self_attn.q_proj` → `self_attn.q_proj` (the name inside `layer`)."""
        return full_name[len(self.prefix):]


@runtime_checkable
class Algorithm(Protocol):
    """Constructed as ``AlgorithmClass(**options)`` (unknown options must raise TypeError naming them)."""

    #: True when the algorithm needs calibration inputs (``calibration=none`` is then a config-time error)
    requires_data: bool
    #: True when `finish_layer` sets codes (at most one per run, and it runs last); False for weight edits
    produces_codes: bool

    def start_layer(self, ctx: LayerContext) -> None:
        """Install hooks / reset per-layer statistics before the calibration pass."""

    def finish_layer(self, ctx: LayerContext) -> None:
        """Edit weights and/or set ``ctx.plans[name].weight_qparams`` and ``.weight_codes``; free statistics."""


#: Optional attributes. For one calibration pass instead of two: a weight editor whose edits leave every Linear's function
#: unchanged and only multiply the inputs of targets by per-channel factors — recorded with
#: ``ctx.scale_inputs`` — sets ``rescales_inputs_only = True``; a code producer that can rescale the statistics it
#: gathered by those factors (``ctx.input_scaling``) sets ``accepts_input_rescaling = True``. When every editor
#: of a run and its producer say so, the driver runs them all on one calibration pass.
#: ``check_layer(layer, prefix)``, also optional, raises `AlgorithmError` for a decoder layout the algorithm cannot
#: handle; the in-memory run calls it on the first decoder layer right after loading, before any evaluation.
#: ``wants_float_outputs = True`` makes the driver also carry the float model's own hidden states from layer to
#: layer and set ``ctx.float_outputs`` (the untouched float layer's outputs on them) before step 1 — targets that
#: let a producer correct the error the quantized layers before it left in its inputs.
#: ``problem(scheme) -> str | None`` (on the instance, so it can read the options): why these options cannot serve
#: this scheme, checked at config time before any model is loaded (e.g. signround's `learn_zero_point` on a
#: symmetric scheme, whose zero point is fixed).
OPTIONAL_ATTRIBUTES = ("rescales_inputs_only", "accepts_input_rescaling", "check_layer", "wants_float_outputs",
                       "problem")


class AlgorithmError(HfquantError, ValueError):
    """An algorithm cannot handle this model or layer; the message names the module and what to do."""
