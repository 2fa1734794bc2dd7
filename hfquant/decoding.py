"""Compiled decoding: `model.generate` on transformers' static key/value cache with each decode step compiled,
on any device — the CPU included.

Why: at batch 1 a small model's decode step on a CPU is mostly per-op dispatch and Python, not arithmetic (a
w4a16 step on an AVX2 CPU: ~9 ms in the int4 kernels of ~50 ms). transformers already compiles decode steps
behind a static cache, but only on accelerators unless told otherwise; this tells it. The prompt's forward stays
eager (weight-only layers keep their dense prefill path). Measured in docs/benchmarks.md ("Compiled decoding").
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .errors import HfquantError

log = logging.getLogger("hfquant")

# Kernels measured slower compiled than eager on a CPU (docs/benchmarks.md): decoding still works, but a user
# asking for speed is told.
SLOWER_COMPILED_ON_CPU = ("Int8DynamicLinear",)


class CompiledDecodingError(HfquantError):
    """The model or the installed transformers cannot decode on a compiled static cache."""


def compile_decoding(model: torch.nn.Module, max_cache_len: Optional[int] = None) -> torch.nn.Module:
    """Make `model.generate` decode on a static cache with compiled steps (returns the same model).

    The first `generate` compiles (a minute or more on a 2-core CPU, cached by torch for later processes); later
    calls reuse it while the cache is long enough. `max_cache_len` sizes the cache for the longest prompt plus new
    tokens you will ask for, so that longer calls do not recompile — but every step attends over the whole cache,
    so keep it near what you use. Greedy decoding gives the same tokens as eager decoding up to float rounding.
    """
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(model, "generate"):
        raise CompiledDecodingError(f"{type(model).__name__} does not generate text (no generation_config): "
                                    "compiled decoding is for causal language models")
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 2):
        raise CompiledDecodingError(f"max_cache_len={max_cache_len!r}: give the longest prompt + new tokens you "
                                    "will generate, an integer ≥ 2 (or None to size the cache per call)")
    compile_config = _compile_config_for(_device_type(model))
    for stale in ("_compiled_call", "_last_compile_config"):  # a deep copy of a compiled model keeps the original's
        model.__dict__.pop(stale, None)  # compiled call, which would run the *original* model's weights
    config.cache_implementation = "static"
    if max_cache_len is not None:
        config.max_cache_len = max_cache_len
    if compile_config is not None:
        config.compile_config = compile_config
    slower = sorted({type(m).__name__ for m in model.modules()} & set(SLOWER_COMPILED_ON_CPU))
    if slower and _device_type(model) == "cpu":
        log.warning("compiled decoding: %s layers decoded slower compiled than eager on a CPU "
                    "(docs/benchmarks.md, \"Compiled decoding\"); time both before you keep it", ", ".join(slower))
    return model


def _device_type(model: torch.nn.Module) -> str:
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device.type if first is not None else "cpu"


def _compile_config_for(device_type: str):
    """transformers' CompileConfig for this device: its own defaults on accelerators (CUDA graphs); on a CPU, one
    that compiles everywhere, without CUDA graphs. None: transformers' defaults apply."""
    try:
        from transformers import CompileConfig
    except ImportError as exc:
        raise CompiledDecodingError("this transformers has no CompileConfig: compiled decoding needs "
                                    "transformers >= 4.48") from exc
    if device_type in ("cuda", "xpu"):
        return None
    if not hasattr(CompileConfig, "_compile_all_devices"):
        import transformers

        raise CompiledDecodingError(f"transformers {transformers.__version__} compiles decode steps only on "
                                    "accelerators (no CompileConfig._compile_all_devices): decode eagerly on this "
                                    "device, or use the transformers version in scripts/constraints.txt")
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling on devices other than accelerators
    return config
