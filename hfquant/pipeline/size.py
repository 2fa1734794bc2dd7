"""Size on disk and bits per parameter: what quantization actually saved."""

from __future__ import annotations

import os

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


def quantized_weight_stats(model: torch.nn.Module) -> dict:
    """Bits per parameter of the quantized Linear weights alone, as saved (codes + scales + zero points): the
    same for the `fake` reference (`QuantLinear`) and the `cpu` kernels, which save the same tensors."""
    from ..formats import QuantLinear
    from ..formats.kernels import _KernelLinear

    bits, params = 0, 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, _KernelLinear)):
            params += m.in_features * m.out_features
            saved = m.state_dict()
            bits += 8 * sum(saved[k].numel() * saved[k].element_size() for k in STORED_WEIGHT_KEYS if k in saved)
    return {"quantized_weights": params, "bits_per_quantized_weight": bits / params if params else None}
