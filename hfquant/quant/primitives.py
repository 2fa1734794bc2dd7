"""quantize / dequantize / fake_quantize: the integer mapping itself, for every strategy."""

from __future__ import annotations

import torch

from . import native
from .args import QuantArgs
from .qparams import check_finite, compute_dtype


def code_dtype(args: QuantArgs) -> torch.dtype:
    """The smallest torch integer type that holds every code of `args` (≤ 8 bits always fits a byte)."""
    return torch.int8 if args.signed else torch.uint8


def zero_point_dtype(args: QuantArgs) -> torch.dtype:
    """How zero points are stored: in the codes' own type, or float16 for `args.float_zero_point`."""
    return torch.float16 if args.float_zero_point else code_dtype(args)


def expand_qparam(p: torch.Tensor, like: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Broadcast a per-group scale/zero point to the columns of `like`; other strategies already broadcast."""
    if args.strategy != "group" or p.dim() == 0:
        return p
    return p.repeat_interleave(args.group_size, dim=-1)[..., : like.shape[-1]]


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integer codes round_half_even(x / scale) + zero_point, clamped into [qmin, qmax] (a float zero point is
    added before rounding: round_half_even(x / scale + zero_point))."""
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    fused = native.codes_with_error(x, scale, zero_point, args, code_dtype(args))
    if fused is not None:
        return fused[0]
    check_finite(x)
    dtype = compute_dtype(x)

    def codes(xc, s, z):
        return _rounded(xc, s, z, args, dtype)[1].to(code_dtype(args)).view(xc.shape)

    return _by_row_chunks(x, scale, zero_point, args, code_dtype(args), codes)


def quantize_with_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs,
                        checked: bool = False):
    """(codes, Σ(x̂ − x)², Σx²): `quantize` plus the squared error of the dequantized result, chunk by chunk so
    the conversion, the error and the energy cost no extra trip through memory. `checked=True` skips the
    NaN/Inf check when the caller's observer already saw this very tensor (min/max would have caught them)."""
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    fused = native.codes_with_error(x, scale, zero_point, args, code_dtype(args))  # one pass, same codes
    if fused is not None:
        return fused
    dtype = compute_dtype(x)
    no_zero = not bool(zero_point.any())  # symmetric signed codes: adding and removing z would be two idle passes
    sums = [0.0, 0.0]

    def codes_and_error(xc, s, z):
        xf = xc.to(dtype).contiguous()
        if not checked:
            check_finite(xf)
        flat = xf.reshape(-1)
        sums[1] += float(torch.dot(flat, flat))
        # a converted copy (bf16 → float32) is ours: x/s may overwrite it; the caller's own float32 rows may not
        y, q, s, z = _rounded(xf, s, None if no_zero else z, args, dtype, in_place=xf.data_ptr() != xc.data_ptr())
        codes = q.to(code_dtype(args)).view(xf.shape)
        d = q.sub_(y) if z is None else q.sub_(z).sub_(y)  # x̂ − x = s·(q − z − x/s), from the same x/s
        if s.dim() == 0:
            sums[0] += float(torch.linalg.vecdot(d.reshape(-1), d.reshape(-1))) * float(s) ** 2
        elif s.shape[-1] == 1:  # one scale per (row, group) or per row: weight each slice's sum by its s²
            s = s.squeeze(-1)
            sums[0] += float(torch.linalg.vecdot(d, d).mul_(s).mul_(s).sum())
        else:
            sums[0] += float((d * d * s * s).sum())
        return codes

    codes = _by_row_chunks(x, scale, zero_point, args, code_dtype(args), codes_and_error)
    return codes, sums[0], sums[1]


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    args: QuantArgs,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values scale * (q - zero_point), in `dtype`."""
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    work = torch.float64 if scale.dtype == torch.float64 else torch.float32

    def values(qc, s, z):
        qv, s, z = _broadcast(qc.to(work), s, z, args, work)
        return ((qv - z) * s).view(qc.shape).to(dtype)

    return _by_row_chunks(q, scale, zero_point, args, dtype, values)


def _broadcast(x, scale, zero_point, args, dtype):
    """(x, scale, zero point) shaped to broadcast against each other, qparams in `dtype`. Whole groups view x as
    (rows, groups, group_size) with (rows, groups, 1) qparams — no expanded copy; anything else expands."""
    if args.strategy == "group" and x.dim() == 2 and scale.dim() == 2 and x.shape[1] == scale.shape[1] * args.group_size:
        return (x.view(x.shape[0], -1, args.group_size), scale.to(dtype).unsqueeze(-1),
                zero_point.to(dtype).unsqueeze(-1))
    return x, expand_qparam(scale, x, args).to(dtype), expand_qparam(zero_point, x, args).to(dtype)


def _rounded(x, scale, zero_point, args, dtype, in_place=False):
    """(x/s, clamp(round(x/s) + z) as floats, s, z), all broadcast-shaped by `_broadcast`; `zero_point=None`
    means z = 0 (and comes back as None). `in_place=True` lets x/s overwrite x (a float copy the caller owns)."""
    z_in = torch.zeros(()) if zero_point is None else zero_point
    xv, s, z = _broadcast(x.to(dtype), scale, z_in, args, dtype)
    y = xv.div_(s) if in_place else xv / s
    if zero_point is None:
        return y, torch.round(y).clamp_(args.qmin, args.qmax), s, None
    if args.float_zero_point:
        return y, torch.add(y, z).round_().clamp_(args.qmin, args.qmax), s, z
    return y, torch.round(y).add_(z).clamp_(args.qmin, args.qmax), s, z


# Weights are processed a few rows at a time (~1 MiB of float32): every temporary stays in cache, and no
# full-size copy of the per-group scales is ever made. The numbers are the same as one whole-tensor pass.
CHUNK_ELEMENTS = 1 << 18


def _by_row_chunks(t, scale, zero_point, args, out_dtype, fn):
    """`fn(rows, their scale, their zero point)` over row chunks of a 2-D weight, into one output tensor; in one
    call for anything else (activations, small tensors)."""
    if not _chunkable(t, scale, args):
        return fn(t, scale, zero_point)
    out = torch.empty(t.shape, dtype=out_dtype, device=t.device)
    step = max(1, CHUNK_ELEMENTS // max(1, t.shape[1]))
    for a in range(0, t.shape[0], step):
        b = min(a + step, t.shape[0])
        rows = (lambda p: p if p.dim() == 0 else p[a:b])
        out[a:b] = fn(t[a:b], rows(scale), rows(zero_point))
    return out


def _chunkable(t: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> bool:
    if t.dim() != 2 or t.numel() <= CHUNK_ELEMENTS:
        return False
    if args.strategy == "tensor":
        return scale.dim() == 0
    return args.strategy in ("channel", "group") and scale.dim() == 2 and scale.shape[0] == t.shape[0]


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Quantize then dequantize, back in x's dtype: the value a quantized kernel would compute with."""
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, dtype=x.dtype)
