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
from .streaming import StreamingError, TensorSource, build_skeleton

log = logging.getLogger("hfquant")


class _ReachedFirstLayer(Exception):
    """Raised by the capture hook: everything after the first decoder layer is not needed (nor loaded)."""


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
def calibrate_sequentially(folder: str, source: TensorSource, spec, windows, observer_cls, dtype: torch.dtype):
    """{module name: (input scale, input zero point)} for every target Linear, observed layer by layer."""
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
    for name in model.state_dict(keep_vars=True):
        if not name.startswith(in_layers) and name in files:
            _set(model, name, source.get(name).to(dtype) if source.dtype(name).is_floating_point else source.get(name))
    captured: List[Tuple[torch.Tensor, dict]] = []

    def capture(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _ReachedFirstLayer

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for i in range(len(windows)):
            try:
                model(input_ids=windows.input_ids[i : i + 1], use_cache=False)
            except _ReachedFirstLayer:
                pass
    finally:
        handle.remove()

    # 2. One layer at a time: load, observe its targets' inputs, compute its outputs, unload.
    observers = {}
    for index, layer in enumerate(tqdm(layers, desc="calibrate layers", unit="layer", leave=False)):
        layer_prefix = f"{prefix}.{index}."
        names = _tensor_names(layer, layer_prefix)
        missing = [n for n in names if n not in files]
        if missing:
            raise StreamingError(f"the checkpoint lacks {missing[0]!r}; use pipeline=in_memory")
        for name in names:
            _set(model, name, source.get(name).to(dtype))
        handles = []
        for name, module in targets.items():
            if name.startswith(layer_prefix):
                obs = observers[name] = observer_cls(spec.scheme.input_activations, **spec.observer_options)
                handles.append(module.register_forward_pre_hook(lambda _m, args, obs=obs: obs.observe(args[0])))
        try:
            for k, (hidden, kwargs) in enumerate(captured):
                out = layer(hidden, **kwargs)
                captured[k] = (out[0] if isinstance(out, tuple) else out, kwargs)
        finally:
            for h in handles:
                h.remove()
        for name in names:
            _set(model, name, None)
    return {name: obs.qparams() for name, obs in observers.items()}
