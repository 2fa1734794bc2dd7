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
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    if _by_rows(x, scale, args):
        out = torch.empty(x.shape, dtype=code_dtype(args), device=x.device)
        for a, b in _row_chunks(x):
            out[a:b] = _quantize(x[a:b], _rows(scale, a, b), _rows(zero_point, a, b), args, dtype)
        return out
    return _quantize(x, scale, zero_point, args, dtype)


def _quantize(x, scale, zero_point, args, dtype):
    if _whole_groups(x, scale, args):
        # whole groups: view x as (rows, groups, group_size) and broadcast the qparams, no expanded copies
        q = torch.round(x.to(dtype).view(x.shape[0], -1, args.group_size) / scale.to(dtype).unsqueeze(-1))
        q = (q + zero_point.to(dtype).unsqueeze(-1)).view(x.shape)
    else:
        s = expand_qparam(scale, x, args).to(dtype)
        z = expand_qparam(zero_point, x, args).to(dtype)
        q = torch.round(x.to(dtype) / s) + z
    return q.clamp_(args.qmin, args.qmax).to(code_dtype(args))


def quantize_with_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs,
                        checked: bool = False):
    """(codes, Σ(x̂ − x)², Σx²): `quantize` plus the squared error of the dequantized result, chunk by chunk so
    the conversion, the error and the energy cost no extra trip through memory. `checked=True` skips the
    NaN/Inf check when the caller's observer already saw this very tensor (min/max would have caught them)."""
    dtype = compute_dtype(x)
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    chunks = list(_row_chunks(x)) if _by_rows(x, scale, args) else [(None, None)]
    out = torch.empty(x.shape, dtype=code_dtype(args), device=x.device)
    error = energy = 0.0
    for a, b in chunks:
        xc = x[a:b].to(dtype).contiguous()
        if not checked:
            check_finite(xc)
        s, z = (scale, zero_point) if a is None else (_rows(scale, a, b), _rows(zero_point, a, b))
        codes, err = _quantize_with_error(xc, s, z, args, dtype)
        out[a:b] = codes
        error += err
        flat = xc.reshape(-1)
        energy += float(torch.dot(flat, flat))
    return out, error, energy


def _quantize_with_error(xc, scale, zero_point, args, dtype):
    """The codes `_quantize` computes, and Σ s²·(q − z − x/s)² (= Σ(x̂ − x)²) from the same x/s."""
    if _whole_groups(xc, scale, args):
        s = scale.to(dtype).unsqueeze(-1)
        z = zero_point.to(dtype).unsqueeze(-1)
        y = xc.view(xc.shape[0], -1, args.group_size) / s
    else:
        s = expand_qparam(scale, xc, args).to(dtype)
        z = expand_qparam(zero_point, xc, args).to(dtype)
        y = xc / s
    q = torch.round(y).add_(z).clamp_(args.qmin, args.qmax)
    codes = q.to(code_dtype(args)).view(xc.shape)
    d2 = q.sub_(z).sub_(y).pow_(2)  # squared error in units of the scale
    if s.dim() == 0:
        err = float(d2.sum()) * float(s) ** 2
    elif s.shape[-1] == 1:  # one scale per (row, group) or per row: weight each slice's sum by its s²
        err = float((d2.sum(-1, keepdim=True) * s * s).sum())
    else:
        err = float((d2 * s * s).sum())
    return codes, err


# Weights are processed a few rows at a time (~1 MiB of float32): every temporary stays in cache, and no
# full-size copy of the per-group scales is ever made. The numbers are the same as one whole-tensor pass.
CHUNK_ELEMENTS = 1 << 18


def _by_rows(x: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> bool:
    if x.dim() != 2 or x.numel() <= CHUNK_ELEMENTS:
        return False
    if args.strategy == "tensor":
        return scale.dim() == 0
    return args.strategy in ("channel", "group") and scale.dim() == 2 and scale.shape[0] == x.shape[0]


def _row_chunks(x: torch.Tensor):
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        yield a, min(a + step, x.shape[0])


def _rows(p: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return p if p.dim() == 0 else p[a:b]


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    args: QuantArgs,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values scale * (q - zero_point), in `dtype`."""
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    if _by_rows(q, scale, args):
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for a, b in _row_chunks(q):
            out[a:b] = _dequantize(q[a:b], _rows(scale, a, b), _rows(zero_point, a, b), args, dtype)
        return out
    return _dequantize(q, scale, zero_point, args, dtype)


def _dequantize(q, scale, zero_point, args, dtype):
    work = torch.float64 if scale.dtype == torch.float64 else torch.float32
    if _whole_groups(q, scale, args):
        g = args.group_size
        out = (q.to(work).view(q.shape[0], -1, g) - zero_point.to(work).unsqueeze(-1)) * scale.to(work).unsqueeze(-1)
        return out.view(q.shape).to(dtype)
    s = expand_qparam(scale, q, args).to(work)
    z = expand_qparam(zero_point, q, args).to(work)
    return (s * (q.to(work) - z)).to(dtype)


def _whole_groups(x, scale, args) -> bool:
    return args.strategy == "group" and x.dim() == 2 and scale.dim() == 2 and x.shape[1] == scale.shape[1] * args.group_size


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Quantize then dequantize, back in x's dtype: the value a quantized kernel would compute with."""
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, dtype=x.dtype)
