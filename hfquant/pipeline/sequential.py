"""Sequential calibration: static activation scales observed one decoder layer at a time.

The model is built with empty weights (accelerate's `init_empty_weights`: parameters on the meta device,
buffers such as rotary tables real). Only the parts before the first decoder layer (embeddings) are loaded;
the calibration windows run up to the first layer, where their hidden states and the layer's keyword inputs
(position embeddings, masks) are captured. Then each layer in turn is loaded from the checkpoint, the
captured hidden states run through it while every target Linear's input is observed, and its outputs become
the next layer's inputs; the layer's weights go back to the meta device before the next one loads.

Peak memory ≈ the embeddings + one layer + the calibration hidden states (num_samples × seq_len × hidden).
The float layer outputs are propagated (not the quantized ones), so the scales are those the in-memory path
observes on the whole model — `tests/pipeline/test_sequential.py` checks they agree.
"""

from __future__ import annotations

import logging
from typing import List, Tuple

import torch
from tqdm.auto import tqdm

from ..plan import target_modules
from .layerwise import capture_first_layer_inputs, layer_output
from .streaming import StreamingError, TensorSource, build_skeleton

log = logging.getLogger("hfquant")


def decoder_layers(model: torch.nn.Module) -> Tuple[str, torch.nn.ModuleList]:
    """(name, ModuleList) of the repeated decoder blocks, found by structure: the ModuleList with one entry per
    `num_hidden_layers` (Llama, Qwen, Gemma, Mistral: `model.layers`; GPT-2: `transformer.h`)."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            candidates.append((name, module))
    exact = [c for c in candidates if expected is not None and len(c[1]) == expected]
    chosen = exact or candidates
    if not chosen:
        raise StreamingError(
            f"sequential calibration could not find the decoder layers of {type(model).__name__} (no ModuleList of "
            "identical blocks, one per config.num_hidden_layers); use pipeline=in_memory, which calibrates the whole "
            "model at once")
    return max(chosen, key=lambda c: len(c[1]))


def _set(model, name: str, value) -> None:
    from accelerate.utils import set_module_tensor_to_device

    if value is None:
        set_module_tensor_to_device(model, name, "meta")
    else:
        set_module_tensor_to_device(model, name, "cpu", value=value)


def _tensor_names(module: torch.nn.Module, prefix: str) -> List[str]:
    """Parameters and persistent buffers: what the checkpoint holds."""
    return [prefix + n for n in module.state_dict(keep_vars=True)]


@torch.no_grad()
def for_each_layer(folder: str, source: TensorSource, spec, windows, dtype: torch.dtype, visit) -> None:
    """Load one decoder layer at a time from the checkpoint and call `visit(model, prefix, layer, targets,
    captured)` with the calibration inputs captured at it; `visit` returns the next layer's inputs."""
    m = spec.model
    model = build_skeleton(folder, m.get("task", "causal-lm"), str(dtype).split(".")[1],
                           bool(m.get("trust_remote_code", False)), None, real_buffers=True).model
    files = source.files
    prefix, layers = decoder_layers(model)
    targets = target_modules(model, spec.scheme)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise StreamingError(f"scheme {spec.scheme.name!r} targets {outside[0]!r}, outside the decoder layers of "
                             f"{type(model).__name__}; add it to scheme.ignore or use pipeline=in_memory")

    # 1. Load what runs before the first layer; capture the first layer's inputs.
    in_layers = prefix + "."
    outer = [name for name in model.state_dict(keep_vars=True) if not name.startswith(in_layers) and name in files]
    for name in outer:
        _set(model, name, source.get(name).to(dtype) if source.dtype(name).is_floating_point else source.get(name))
    captured = capture_first_layer_inputs(model, layers[0], windows)
    for name in outer:  # embeddings, final norm, lm_head: not needed again (a 7B model's are ~0.5 GB each)
        _set(model, name, None)

    # 2. One layer at a time: load, visit, unload.
    for index, layer in enumerate(tqdm(layers, desc="layers", unit="layer", leave=False)):
        layer_prefix = f"{prefix}.{index}."
        names = _tensor_names(layer, layer_prefix)
        missing = [n for n in names if n not in files]
        if missing:
            raise StreamingError(f"the checkpoint lacks {missing[0]!r}; use pipeline=in_memory")
        for name in names:
            _set(model, name, source.get(name).to(dtype))
        in_layer = {n: mod for n, mod in targets.items() if n.startswith(layer_prefix)}
        captured = visit(model, layer_prefix, layer, in_layer, captured, index == len(layers) - 1)
        for name in names:
            _set(model, name, None)


@torch.no_grad()
def calibrate_sequentially(folder: str, source: TensorSource, spec, windows, observer_cls, dtype: torch.dtype):
    """{module name: (input scale, input zero point)} for every target Linear, observed layer by layer."""
    observers = {}

    def observe(_model, _prefix, layer, targets, captured, _last):
        handles = []
        for name, module in targets.items():
            obs = observers[name] = observer_cls(spec.scheme.input_activations, **spec.observer_options)
            handles.append(module.register_forward_pre_hook(lambda _m, args, obs=obs: obs.observe(args[0])))
        try:
            return [(layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in captured]
        finally:
            for h in handles:
                h.remove()

    for_each_layer(folder, source, spec, windows, dtype, observe)
    return {name: obs.qparams() for name, obs in observers.items()}


@torch.no_grad()
def quantize_sequentially(folder: str, source: TensorSource, spec, windows, dtype: torch.dtype, quantizer, module_plans) -> None:
    """Run the algorithm chain layer by layer on the checkpoint (what `layerwise.quantize_in_memory` does on a
    loaded model); each target is compressed as soon as its layer is finished (`quantizer.ready`), so memory
    holds one float layer plus the packed results."""
    from .layerwise import check_layer_support, context_factory, quantize_layer
    from ..plan import QuantPlan

    plan = QuantPlan(spec.scheme, spec.observer, dict(spec.observer_options), module_plans)

    def learn(model, prefix, layer, targets, captured, last):
        # each layer as it is loaded: refuse (or, under algorithm=auto, drop from here on) what cannot handle it
        quantizer.dropped += check_layer_support(quantizer.chain, layer, prefix, spec.algorithm_auto)
        ctx = context_factory(plan, quantizer.make_observer, quantizer.round_scale, model)(prefix, layer, targets)
        ctx.num_samples = len(captured)
        following = quantize_layer(quantizer.chain, ctx, captured, last)
        if quantizer.chain.edits_weights:  # folded scales live in norms / non-target Linears: keep the edited ones
            owned = {f"{n}.{leaf}" for n in targets for leaf in ("weight", "bias")}
            for local, tensor in layer.state_dict().items():
                if prefix + local not in owned and tensor.is_floating_point():
                    quantizer.edited[prefix + local] = tensor.detach().clone()
        for name, linear in targets.items():
            quantizer.ready[name] = quantizer(module_plans[name], linear.weight.detach().clone(),
                                              None if linear.bias is None else linear.bias.detach().clone())
        quantizer.spill()  # to disk until the writer reaches them: memory holds one layer, not the whole model
        return following

    quantizer.chain.float_inputs = None  # both streams start at the captured inputs
    for_each_layer(folder, source, spec, windows, dtype, learn)
