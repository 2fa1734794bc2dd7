"""Bit packing of integer codes: 4-bit codes two per byte, 2-bit codes four per byte, 8-bit as is.

Codes are offset to unsigned (code - qmin) and packed low bits first along the last dimension, which
is padded to a whole byte; `unpack` needs the original length to drop the padding.
"""

from __future__ import annotations

import torch

from .args import QuantArgs

PACKABLE_BITS = (2, 4, 8)


def storage_bits(num_bits: int) -> int:
    """Bits each code occupies on disk; 3-bit codes have no packed format here and are refused."""
    if num_bits not in PACKABLE_BITS:
        raise ValueError(
            f"num_bits={num_bits} has no packed storage format; allowed: {', '.join(map(str, PACKABLE_BITS))}"
        )
    return num_bits


def pack(q: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Pack codes (int8/uint8 in [qmin, qmax]) into a uint8 tensor; last dim becomes ceil(n * bits / 8)."""
    bits = storage_bits(args.num_bits)
    # code − qmin in uint8 arithmetic: wraps to the same bytes as the wide difference, without a wider copy
    u = q.view(torch.uint8) if q.dtype == torch.int8 else q.to(torch.uint8)
    u = u - (args.qmin & 0xFF) if args.qmin else u.clone()
    if bits == 8:
        return u
    per_byte = 8 // bits
    n = u.shape[-1]
    pad = (-n) % per_byte
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, per_byte)
    out = u[..., 0].clone()
    for i in range(1, per_byte):
        out |= u[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, args: QuantArgs, length: int) -> torch.Tensor:
    """Inverse of `pack`: codes of the last dim `length`, as int8 (signed) or uint8 (unsigned)."""
    bits = storage_bits(args.num_bits)
    dtype = torch.int8 if args.signed else torch.uint8
    if bits == 8:
        u = packed
    else:
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
        u = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :length]
    return (u.to(torch.int16) + args.qmin).to(dtype)
