"""Calibration: the plan's target modules, and static activation qparams from forward pre-hooks.

Observers keep reduced statistics only, so memory stays bounded however many batches stream through.
Hooks are removed even if a batch fails.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..observer import Observer
from ..plan import ModulePlan, QuantPlan, target_modules
from ..scheme import QuantScheme


def build_plan(
    model: torch.nn.Module,
    scheme: QuantScheme,
    observer_name: str,
    observer_cls: Type[Observer],
    observer_options: dict,
    windows=None,
    activation_observer_cls: Optional[Type[Observer]] = None,
    observe: bool = True,
) -> QuantPlan:
    """A `QuantPlan` listing every target module, with static activation qparams observed on `windows` (schemes
    with static activations; `observe=False` skips that, for backends with their own statistics). Weight
    qparams and codes are the algorithms' job (`hfquant.pipeline.layerwise`)."""
    targets = target_modules(model, scheme)
    plan = QuantPlan(scheme, observer_name, dict(observer_options))
    for name in targets:
        plan.modules[name] = ModulePlan(name, scheme.weights, input_args=scheme.input_activations)
    if scheme.needs_calibration_data and observe:
        if windows is None:
            raise ConfigError(f"scheme {scheme.name!r} has static activations and needs calibration data; set calibration=pydoc (or another dataset)")
        act_qparams = observe_activations(model, targets, scheme, activation_observer_cls or observer_cls, observer_options, windows)
        for name, qp in act_qparams.items():
            plan.modules[name].input_qparams = qp
    return plan


@torch.no_grad()
def observe_activations(model, targets: Dict[str, torch.nn.Module], scheme: QuantScheme, observer_cls, options, windows):
    """Stream the calibration windows through the model, observing each target's input."""
    observers = {name: observer_cls(scheme.input_activations, **options) for name in targets}
    handles = []
    for name, module in targets.items():
        obs = observers[name]
        handles.append(module.register_forward_pre_hook(lambda _m, args, obs=obs: obs.observe(args[0])))
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(len(windows)), desc="calibrate", unit="sample", leave=False):
            model(input_ids=windows.input_ids[i : i + 1].to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: obs.qparams() for name, obs in observers.items()}
