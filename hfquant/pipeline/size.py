"""Size on disk and bits per parameter: what quantization actually saved."""

from __future__ import annotations

import os
import sys

import torch


def folder_bytes(path: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(suffix))


def unique_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the unquantized model, tied weights counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors (parameters and persistent buffers), shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


STORED_WEIGHT_KEYS = ("weight_packed", "weight_scale", "weight_zero_point")


def bitsandbytes_linears() -> tuple:
    """bitsandbytes' quantized Linear classes, if the bitsandbytes backend has imported it (never imported here)."""
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def stored_weight_bits(module: torch.nn.Module) -> int:
    """Bits the module's weight takes as saved: hfquant's codes + scales + zero points, or everything but the
    bias for bitsandbytes (packed codes, absmax and its nested quantization, the code map, SCB)."""
    saved = module.state_dict()
    if isinstance(module, bitsandbytes_linears()):
        keys = [k for k in saved if k != "bias"]
    else:
        keys = [k for k in STORED_WEIGHT_KEYS if k in saved]
    return 8 * sum(saved[k].numel() * saved[k].element_size() for k in keys)


def quantized_weight_stats(model: torch.nn.Module, exclude=()) -> dict:
    """Bits per parameter of the quantized Linear weights alone, as saved, for every kind of quantized Linear
    the backends make: `fake` (`QuantLinear`) and `cpu` (kernel Linears) save the same tensors, so they report
    the same numbers; bitsandbytes' Linear4bit / Linear8bitLt count their own stored tensors."""
    from ..formats import QuantLinear
    from ..formats.kernels import _KernelLinear

    kinds = (QuantLinear, _KernelLinear) + bitsandbytes_linears()
    bits, params = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, kinds) and name not in exclude:
            params += m.in_features * m.out_features
            bits += stored_weight_bits(m)
    return {"quantized_weights": params, "bits_per_quantized_weight": bits / params if params else None}
