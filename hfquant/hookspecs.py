"""Every hook a plugin can implement. Hooks are coarse: each is called once per process, never per tensor.

Registration hooks receive a host-owned ``register(name, obj)`` callback. Names are lower-case-hyphenated
(``my-observer``); registering a name that another plugin already registered is an error naming both.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("hfquant")
hookimpl = pluggy.HookimplMarker("hfquant")


@hookspec
def register_observers(register):
    """Register observer classes: ``register("name", ObserverClass)``.

    An observer is constructed as ``ObserverClass(args: QuantArgs, **options)``; ``observe(tensor)`` is
    called once per weight or once per calibration batch (memory must stay bounded); ``qparams()`` returns
    ``(scale, zero_point)`` shaped for ``args.strategy``. Subclass ``hfquant.Observer`` to get this for free.
    """


@hookspec
def register_schemes(register):
    """Register scheme presets: ``register("name", QuantScheme(...))`` (weights, activations, targets, ignore)."""


@hookspec
def register_algorithms(register):
    """Register algorithms that choose integer codes or edit weights: ``register("name", AlgorithmClass)``.

    ``AlgorithmClass(**options)`` must satisfy ``hfquant.Algorithm``: ``requires_data`` and ``produces_codes``
    attributes, ``start_layer(ctx)`` and ``finish_layer(ctx)`` called once per decoder layer with a
    ``hfquant.LayerContext``; see docs/plugins.md for the order of calls and what each may change.
    """


@hookspec
def register_formats(register):
    """Register on-disk formats: ``register("name", FormatClass)``.

    ``FormatClass.problem(scheme)`` says (at config time) why a scheme cannot be stored; ``FormatClass(scheme)``
    then provides ``compress(module_plan, {"weight", "bias"}) -> {local name: tensor}`` (pure: the same call for a
    live module and for tensors streamed from a checkpoint), ``parameter_names`` and ``quantization_config``.
    See ``hfquant.Format`` and docs/plugins.md.
    """


@hookspec
def register_backends(register):
    """Register backends: ``register("name", BackendClass)``; see docs/plugins.md for the Backend protocol."""


@hookspec
def register_datasets(register):
    """Register text sources for calibration and evaluation: ``register("name", DatasetClass)``."""


@hookspec
def register_evaluators(register):
    """Register evaluators that compare the baseline and the quantized model: ``register("name", EvaluatorClass)``."""


@hookspec
def register_configs(config_store):
    """Add structured-config nodes to Hydra's ``ConfigStore`` (e.g. an ``observer`` group option)."""
