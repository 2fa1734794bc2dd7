"""Bit packing of integer codes: 4-bit codes two per byte, 2-bit codes four per byte, 8-bit as is.

Codes are offset to unsigned (code - qmin) and packed low bits first along the last dimension, which
is padded to a whole byte; `unpack` needs the original length to drop the padding.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ..allocator import advise_huge_pages
from . import native
from .args import QuantArgs

PACKABLE_BITS = (2, 4, 8)


def storage_bits(num_bits: int) -> int:
    """Bits each code occupies on disk; 3-bit codes have no packed format here and are refused."""
    if num_bits not in PACKABLE_BITS:
        raise ValueError(
            f"num_bits={num_bits} has no packed storage format; allowed: {', '.join(map(str, PACKABLE_BITS))}"
        )
    return num_bits


def pack(q: torch.Tensor, args: QuantArgs, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pack codes (int8/uint8 in [qmin, qmax]) into a uint8 tensor; last dim becomes ceil(n * bits / 8).

    `out` (uint8, the packed shape) receives the bytes directly, e.g. a module's buffer. Rows go a chunk at a
    time (~256 KiB of codes), so every temporary stays in cache: one 11008×4096 int4 weight packs in ~40 ms
    instead of 136–200 ms as whole-tensor passes (2 vCPU, one thread; scripts/bench_quantize.py)."""
    bits = storage_bits(args.num_bits)
    n = q.shape[-1] if q.dim() else 1
    shape = (*q.shape[:-1], -(-n * bits // 8))
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=q.device)
    elif out.shape != shape or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"pack: out must be a contiguous uint8 tensor of shape {tuple(shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    advise_huge_pages(out)  # usually fresh (its own, or a new module's buffer): faulted in 2 MiB at a time
    if native.pack(q, args, bits, out):  # one pass, same bytes
        return out
    if bits == 8:  # one byte per code: code − qmin straight into out
        u = _code_bytes(q)
        return torch.sub(u, args.qmin & 0xFF, out=out) if args.qmin else out.copy_(u)
    if q.dim() < 2 or q.numel() <= CHUNK_CODES:
        out.copy_(_packed_rows(q, args, bits))
        return out
    rows, flat_out = q.reshape(-1, n), out.view(-1, shape[-1])
    step = max(1, CHUNK_CODES // n)
    for a in range(0, rows.shape[0], step):
        flat_out[a:a + step] = _packed_rows(rows[a:a + step], args, bits)
    return out


CHUNK_CODES = 1 << 18


def _code_bytes(q: torch.Tensor) -> torch.Tensor:
    """The codes as uint8 (int8 reinterpreted): code − qmin in uint8 arithmetic then wraps to the same bytes as the
    wide difference, without a wider copy."""
    return q.view(torch.uint8) if q.dtype == torch.int8 else q.to(torch.uint8)


def _packed_rows(q: torch.Tensor, args: QuantArgs, bits: int) -> torch.Tensor:
    """Rows of 2- or 4-bit codes packed, as a new tensor."""
    u = _code_bytes(q)
    # contiguous: elementwise ops keep a transposed input's strides, and the int16 view below needs whole rows
    u = (u - (args.qmin & 0xFF) if args.qmin else u).contiguous()
    n = u.shape[-1]
    if bits == 4 and n % 2 == 0 and sys.byteorder == "little":
        # two codes per int16 word (element 2i in the low byte): low nibble from the low byte, high nibble from
        # the high byte, in three word-wide ops instead of strided byte ones
        v = u.view(torch.int16)
        return (v & 0x0F).bitwise_or_((v >> 4) & 0xF0).to(torch.uint8)
    per_byte = 8 // bits
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
