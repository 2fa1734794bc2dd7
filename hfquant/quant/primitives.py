"""quantize / dequantize / fake_quantize: the integer mapping itself, for every strategy."""

from __future__ import annotations

import torch

from .args import QuantArgs
from .qparams import check_finite, compute_dtype


def code_dtype(args: QuantArgs) -> torch.dtype:
    """The smallest torch integer type that holds every code of `args` (≤ 8 bits always fits a byte)."""
    return torch.int8 if args.signed else torch.uint8


def expand_qparam(p: torch.Tensor, like: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Broadcast a per-group scale/zero point to the columns of `like`; other strategies already broadcast."""
    if args.strategy != "group" or p.dim() == 0:
        return p
    return p.repeat_interleave(args.group_size, dim=-1)[..., : like.shape[-1]]


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integer codes round_half_even(x / scale) + zero_point, clamped into [qmin, qmax]."""
    check_finite(x)
    dtype = compute_dtype(x)
    s = expand_qparam(torch.as_tensor(scale), x, args).to(dtype)
    z = expand_qparam(torch.as_tensor(zero_point), x, args).to(dtype)
    q = torch.round(x.to(dtype) / s) + z
    return q.clamp_(args.qmin, args.qmax).to(code_dtype(args))


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    args: QuantArgs,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values scale * (q - zero_point), in `dtype`."""
    scale = torch.as_tensor(scale)
    work = torch.float64 if scale.dtype == torch.float64 else torch.float32
    s = expand_qparam(scale, q, args).to(work)
    z = expand_qparam(torch.as_tensor(zero_point), q, args).to(work)
    return (s * (q.to(work) - z)).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Quantize then dequantize, back in x's dtype: the value a quantized kernel would compute with."""
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, dtype=x.dtype)
