"""Compiled decoding: `model.generate` on transformers' static key/value cache with each decode step compiled,
on any device — the CPU included.

Why: at batch 1 a small model's decode step on a CPU is mostly per-op dispatch and Python, not arithmetic (a
w4a16 step on an AVX2 CPU: ~9 ms in the int4 kernels of ~50 ms). transformers already compiles decode steps
behind a static cache, but only on accelerators unless told otherwise; this tells it. The prompt's forward stays
eager (weight-only layers keep their dense prefill path). Measured in docs/benchmarks.md ("Compiled decoding").

Limits (transformers' and torch.compile's): greedy decoding and sampling are compiled, beam search is not; the
batch size and the cache length are fixed per compilation (a new one compiles again, and after torch's
recompile limit decoding falls back to eager); a `cache=` passed to `generate` is refused while this is on; call
it after moving the model to its device, and again on a copy.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import HfquantError

# Devices where transformers compiles decode steps by itself, with its own settings (CUDA graphs on CUDA).
ACCELERATORS = ("cuda", "xpu", "neuron", "tpu")
# What a model remembers between `generate` calls: its compiled call (bound to *that* model, so a deep copy's would
# run the original's weights) and the longest static cache so far (which would override a smaller max_cache_len).
_REMEMBERED = ("_compiled_call", "_last_compile_config", "_previous_max_cache_length")
_SAVED_EAGER = "_hfquant_eager_generation"


class CompiledDecodingError(HfquantError, ValueError):
    """The model or the installed transformers cannot decode on a compiled static cache."""


def compile_decoding(model: torch.nn.Module, max_cache_len: Optional[int] = None) -> torch.nn.Module:
    """Make `model.generate` decode on a static cache with compiled steps (returns the same model).

    The first `generate` in each process compiles (16–108 s on a 2-core CPU in docs/benchmarks.md); later calls
    reuse it while the batch size and cache length stay. `max_cache_len` sizes the cache for the longest prompt plus
    new tokens you will ask for, so that longer calls do not recompile — every step attends over the whole cache, so
    keep it near what you use (None: sized by the first call, grown by longer ones, each growth a recompilation).
    It changes `model.generation_config`: call `eager_decoding(model)` before `save_pretrained`, or the saved
    folder asks every loader for a static cache.
    """
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(model, "generate"):
        raise CompiledDecodingError(f"{type(model).__name__} does not generate text (no generation_config): "
                                    "compiled decoding is for causal language models")
    if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                      or max_cache_len < 2):
        raise CompiledDecodingError(f"max_cache_len={max_cache_len!r}: give the longest prompt + new tokens you "
                                    "will generate, an integer ≥ 2 (or None to size the cache by the calls)")
    _refuse_what_transformers_will_not_compile(model)
    compile_config = _compile_config_for(_device_type(model))
    if _SAVED_EAGER not in model.__dict__:
        model.__dict__[_SAVED_EAGER] = {key: getattr(config, key, None)
                                        for key in ("cache_implementation", "max_cache_len", "compile_config")}
    for remembered in _REMEMBERED:
        model.__dict__.pop(remembered, None)
    config.cache_implementation = "static"
    config.max_cache_len = max_cache_len
    config.compile_config = compile_config
    return model


def eager_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `compile_decoding`: the generation settings it changed are put back (do this before `save_pretrained`)."""
    saved = model.__dict__.pop(_SAVED_EAGER, None)
    if saved is not None:
        for key, value in saved.items():
            setattr(model.generation_config, key, value)
    for remembered in _REMEMBERED:
        model.__dict__.pop(remembered, None)
    return model


def _refuse_what_transformers_will_not_compile(model: torch.nn.Module) -> None:
    """transformers skips compilation for these without an error of its own; say so before anything changes."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", type(quantizer).__name__)
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum → "bitsandbytes"
        raise CompiledDecodingError(f"transformers does not compile models quantized by {method}: decode without "
                                    "compile_decoding (hfquant's own folders compile; bitsandbytes' do not)")
    places = set(getattr(model, "hf_device_map", {}).values())
    if "disk" in places or ("cpu" in places and len(places) > 1):
        raise CompiledDecodingError("transformers does not compile a model offloaded to the CPU or disk "
                                    f"(device_map places it on {sorted(map(str, places))}): load it on one device")


def _device_type(model: torch.nn.Module) -> str:
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device.type if first is not None else "cpu"


def _compile_config_for(device_type: str):
    """transformers' CompileConfig for this device: None on accelerators (transformers' own defaults apply there);
    elsewhere one that compiles on every device, without CUDA graphs."""
    if device_type in ACCELERATORS:
        return None
    from transformers import CompileConfig

    if not hasattr(CompileConfig, "_compile_all_devices"):
        import transformers

        raise CompiledDecodingError(f"transformers {transformers.__version__} compiles decode steps only on "
                                    "accelerators (its CompileConfig has no _compile_all_devices): decode eagerly "
                                    "here, or install a transformers release hfquant is tested with (5.24)")
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling on devices other than accelerators
    return config
