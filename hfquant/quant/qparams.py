"""Observed ranges and the scale / zero point they imply; pure functions of tensors and `QuantArgs`."""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from .args import QuantArgs

Reducer = Callable[[torch.Tensor], torch.Tensor]


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Refuse NaN/Inf early: they would silently poison every scale computed from them. (Max and min propagate
    NaN and show ±Inf, so two reductions decide it; the element-wise count runs only to word the error.)"""
    if x.numel() == 0 or not x.dtype.is_floating_point:
        return
    if bool(torch.isfinite(x.amax())) and bool(torch.isfinite(x.amin())):
        return
    bad = int((~torch.isfinite(x)).sum())
    raise ValueError(
        f"{what} contains NaN or Inf ({bad} of {x.numel()} values); quantization needs finite "
        "values — check the model weights or the calibration data"
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for exact reference math); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reduce_by_strategy(x: torch.Tensor, args: QuantArgs, reduce_last: Reducer) -> torch.Tensor:
    """Apply `reduce_last` (reduces the last dim, keepdim) over the slices that share one scale.

    Result shapes broadcast against `x`: tensor → (), channel → (out, 1, ...), token → (..., 1),
    group → (out, n_groups) where the last group may be smaller than `group_size`.
    """
    if args.strategy == "tensor":
        return reduce_last(x.reshape(1, -1)).reshape(())
    if args.strategy == "channel":
        if x.dim() < 2:
            raise ValueError(f"strategy='channel' needs a tensor with >= 2 dims, got shape {tuple(x.shape)}")
        return reduce_last(x.reshape(x.shape[0], -1)).reshape((x.shape[0],) + (1,) * (x.dim() - 1))
    if args.strategy == "token":
        return reduce_last(x.reshape(-1, x.shape[-1])).reshape(tuple(x.shape[:-1]) + (1,))
    # group
    if x.dim() != 2:
        raise ValueError(f"strategy='group' needs a 2-D weight (out, in), got shape {tuple(x.shape)}")
    rows, cols = x.shape
    g = args.group_size
    full = (cols // g) * g
    parts = []
    if full:
        parts.append(reduce_last(x[:, :full].reshape(rows, cols // g, g)).reshape(rows, cols // g))
    if full < cols:
        parts.append(reduce_last(x[:, full:]).reshape(rows, 1))
    return torch.cat(parts, dim=1)


def min_max(x: torch.Tensor, args: QuantArgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The observed (min, max) for each slice that shares a scale."""
    check_finite(x)
    xf = x.to(compute_dtype(x))
    lo = reduce_by_strategy(xf, args, lambda t: t.amin(dim=-1, keepdim=True))
    hi = reduce_by_strategy(xf, args, lambda t: t.amax(dim=-1, keepdim=True))
    return lo, hi


def compute_qparams(
    min_vals: torch.Tensor, max_vals: torch.Tensor, args: QuantArgs
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (integer; float with `args.float_zero_point`) for an observed range.

    The range is widened to include 0 so that real zero is exactly representable (padding, ReLU zeros).
    Asymmetric: scale = (max - min) / (qmax - qmin), zero_point = round(qmin - min / scale), clamped.
    Symmetric: scale = max(|min|, |max|) / ((qmax - qmin) // 2), zero point 0 (signed) or the mid code.
    Symmetric full range: scale = v / qmin where v is the signed value of largest magnitude (min or max), so v
    maps to qmin exactly and every level is used; the scale is negative when v > 0.
    """
    min_vals = torch.as_tensor(min_vals)
    max_vals = torch.as_tensor(max_vals)
    dtype = torch.float64 if torch.float64 in (min_vals.dtype, max_vals.dtype) else torch.float32
    check_finite(min_vals, "observed minimum")
    check_finite(max_vals, "observed maximum")
    lo = torch.clamp(min_vals.to(dtype), max=0.0)
    hi = torch.clamp(max_vals.to(dtype), min=0.0)
    if args.symmetric:
        if args.full_range:
            scale = _usable(torch.where(-lo >= hi, lo, hi) / args.qmin)
        else:
            half_range = (args.qmax - args.qmin) // 2
            scale = _usable(torch.maximum(-lo, hi) / half_range)
        mid = 0 if args.signed else (args.qmin + args.qmax + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
    elif args.float_zero_point:  # min lands exactly on qmin (up to the zero point's float16 storage)
        scale = _usable((hi - lo) / (args.qmax - args.qmin))
        zero_point = stored_zero_point(args.qmin - lo / scale, args)
    else:
        scale = _usable((hi - lo) / (args.qmax - args.qmin))
        zero_point = torch.round(args.qmin - lo / scale).clamp(args.qmin, args.qmax).to(torch.int32)
    return scale, zero_point


def stored_zero_point(zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """A float zero point as the format stores it (float16, inside [qmin, qmax]), returned as float32: codes are
    always computed from this value, so what is reported and what is saved agree exactly."""
    z = torch.as_tensor(zero_point).to(torch.float32).clamp(args.qmin, args.qmax)
    return z.to(torch.float16).to(torch.float32)


def _usable(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero range gets scale 1; a subnormal scale (ranges of ~1e-38 and below) is raised in magnitude to the
    smallest normal number, where division still keeps the error within half a step (subnormal steps round too
    coarsely). The sign is kept: full-range scales may be negative."""
    tiny = torch.finfo(scale.dtype).tiny
    magnitude = scale.abs().clamp(min=tiny)
    return torch.where(scale != 0, torch.where(scale < 0, -magnitude, magnitude), torch.ones_like(scale))


def dynamic_qparams(x: torch.Tensor, args: QuantArgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams of `x` itself, as used for dynamic (run-time) activation quantization."""
    return compute_qparams(*min_max(x, args), args)


def scale_in_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as a `dtype` tensor stores them, back in float32: sign kept, finite (clamped to the dtype's range) and
    never 0 (the dtype's smallest normal) — what a format that stores bf16/fp16 scales applies before codes."""
    info = torch.finfo(dtype)
    s = scale.to(torch.float32).clamp(-info.max, info.max).to(dtype).float()
    tiny = torch.full_like(s, float(info.tiny))
    return torch.where(s == 0, torch.where(scale < 0, -tiny, tiny), s)
