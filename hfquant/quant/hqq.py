"""Data-free error minimisation of scales and integer zero points (HQQ-style: no calibration data).

Round-to-nearest takes each slice's (scale, zero point) from its min/max, which leaves two things on the table:
the half step of rounding room at both ends of the grid (the extremes may round to the edge codes rather than
sit exactly on them), and the scale that minimises ‖w − ŵ‖ for the codes actually chosen. Per slice, this module
tries integer zero points near the initial one, each started from the finest scale that keeps the slice's
extremes within `margin` steps of the code range, alternates codes ↔ least-squares (scale, zero point) a few
times (HQQ's alternating closed-form updates), and keeps the best candidate by Σ|w − ŵ|^norm, never worse than
the start.

Measured on SmolLM2-135M (int4, pydoc perplexity): HQQ's float zero point rounded to an integer — hfquant stores
integer zero points — loses all of its gain over round-to-nearest; and letting the scale shrink freely (clipping
the largest weights) lowers the squared weight error but raises perplexity, so no candidate may clip a slice's
extremes by more than `margin` of a step (or by more than round-to-nearest did). HQQ's lp (p < 1) shrinkage of
the error did not beat plain least squares here, so the fits are least squares and `norm` only ranks candidates.

With float zero points (`QuantArgs.float_zero_point`) the zero point is HQQ's own: `optimize_zero_points` keeps
the observer's scale and runs HQQ's half-quadratic zero update from the observer's zero point rounded to an
integer, stopping when the tensor's mean |w − ŵ| stops falling. Measured on the embedded model at group 64 it
reproduces the HQQ library (1.138 out of domain); the same update started from the unrounded zero point, and the
least-squares search above, both reach *lower* weight error and *higher* perplexity (1.20), so weight error is not
what this path optimises.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .args import QuantArgs
from .qparams import reduce_by_strategy, stored_zero_point

RoundScale = Callable[[torch.Tensor], torch.Tensor]
# Rows are processed a few at a time (~1 MiB of float32 per temporary), so memory stays bounded on any weight.
CHUNK_ELEMENTS = 1 << 18
# Relative slack of the no-clipping test: the backend's scale rounding (bf16: < 0.4%) may move an edge a hair.
SLACK = 1.0 / 64


def optimize_qparams(weight: torch.Tensor, args: QuantArgs, init: Tuple[torch.Tensor, torch.Tensor],
                     iterations: int = 3, round_scale: Optional[RoundScale] = None, zero_radius: int = 1,
                     margin: float = 0.5, norm: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) for `weight` (out, in) that lower Σ|w − ŵ|^norm per slice of `args.strategy`.

    `init` is the starting (scale, zero point), e.g. the observer's, shaped as `compute_qparams` returns them;
    the result has the same shapes and dtypes (zero points int32 inside [qmin, qmax]; float32 holding float16
    values for `args.float_zero_point`, whose starts are the observer's zero point and the least-squares refits). Every scale tried passes
    through `round_scale` before its codes are computed, so the returned scales are exactly the ones evaluated.
    Signs are kept (full-range symmetric scales may be negative); symmetric schemes keep their zero point.
    """
    if args.strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"optimize_qparams handles weight strategies tensor, channel and group, not {args.strategy!r}")
    if iterations < 0 or zero_radius < 0 or margin < 0 or norm <= 0:
        raise ValueError(f"need iterations >= 0, zero_radius >= 0, margin >= 0 and norm > 0; got iterations="
                         f"{iterations}, zero_radius={zero_radius}, margin={margin}, norm={norm}")
    rs = round_scale or (lambda s: s)
    w = weight.detach()
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale0, zp0 = torch.as_tensor(init[0]), torch.as_tensor(init[1])
    scale = scale0.to(work).clone()
    zero_type = torch.float32 if args.float_zero_point else torch.int32
    zp = torch.broadcast_to(zp0, scale.shape).to(zero_type).clone()
    solve = lambda x, s, z: _solve(x, s.unsqueeze(-1), z.unsqueeze(-1).to(work), args, rs, iterations,  # noqa: E731
                                   zero_radius, margin, norm)
    if args.strategy == "tensor":
        s, z = solve(w.reshape(1, 1, -1).to(work), scale.reshape(1, 1), zp.reshape(1, 1))
        return s.reshape(scale.shape).to(scale0.dtype), z.to(zero_type).reshape(zp.shape)
    rows = w.shape[0]
    w2, s2, z2 = w.reshape(rows, -1), scale.reshape(rows, -1), zp.reshape(rows, -1)
    cols = w2.shape[1]
    size = args.group_size if args.strategy == "group" else cols
    whole = cols // size
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        if whole:  # (rows, groups, group_size) views: every whole group at once
            x = w2[a:b, : whole * size].to(work).reshape(b - a, whole, size)
            s, z = solve(x, s2[a:b, :whole], z2[a:b, :whole])
            s2[a:b, :whole], z2[a:b, :whole] = s.squeeze(-1), z.squeeze(-1).to(zero_type)
        if whole * size < cols:  # the smaller last group
            x = w2[a:b, whole * size:].to(work).unsqueeze(1)
            s, z = solve(x, s2[a:b, -1:], z2[a:b, -1:])
            s2[a:b, -1:], z2[a:b, -1:] = s.squeeze(-1), z.squeeze(-1).to(zero_type)
    return s2.reshape(scale.shape).to(scale0.dtype), z2.reshape(zp.shape)


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Codes as floats, exactly as `quantize` rounds them (half to even, then clamped)."""
    if args.float_zero_point:
        return torch.div(x, s).add_(z).round_().clamp_(args.qmin, args.qmax)
    return torch.round(x / s).add_(z).clamp_(args.qmin, args.qmax)


class _Best:
    """The best (scale, zero point) per slice so far, by error, among candidates that respect the clipping bound."""

    def __init__(self, x, s, z, args, margin, norm):
        self.x, self.args, self.margin, self.norm = x, args, margin, norm
        d = (_codes(x, s, z, args) - z).mul_(s).sub_(x).abs_()
        self.bound = d.amax(-1, keepdim=True)  # round-to-nearest's largest error: always allowed
        self.s, self.z, self.err = s.clone(), z.clone(), self._sum(d)

    def _sum(self, d):
        return (d.square() if self.norm == 2 else d.pow(self.norm)).sum(-1, keepdim=True)

    def offer(self, s, z, q=None):
        """Keep (s, z) where it beats the best so far without clipping more than allowed; returns the codes."""
        q = _codes(self.x, s, z, self.args) if q is None else q
        d = (q - z).mul_(s).sub_(self.x).abs_()
        allowed = torch.maximum(self.bound, self.margin * s.abs()) * (1 + SLACK)
        err = torch.where(d.amax(-1, keepdim=True) <= allowed, self._sum(d), torch.full_like(self.err, float("inf")))
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.s = torch.where(better, s, self.s)
        self.z = torch.where(better, z, self.z)
        return q


def _extents(x, s):
    """(P, N): how far the slice reaches towards qmax and towards qmin, in real units (signs follow the scale)."""
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    lo = x.amin(-1, keepdim=True).clamp(max=0).neg_()
    return torch.where(s > 0, hi, lo), torch.where(s > 0, lo, hi)


def _finest(extents, z, args, margin):
    """The smallest |scale| at which zero point z keeps both extremes within `margin` steps of the code range."""
    up, down = extents
    room_up, room_down = (args.qmax - z + margin), (z - args.qmin + margin)
    need_up = torch.where(up > 0, up / room_up.clamp(min=1e-9), torch.zeros_like(up))
    need_down = torch.where(down > 0, down / room_down.clamp(min=1e-9), torch.zeros_like(down))
    bad = ((up > 0) & (room_up <= 0)) | ((down > 0) & (room_down <= 0))
    return torch.where(bad, torch.full_like(up, float("inf")), torch.maximum(need_up, need_down))


def _solve(x, s, z, args, rs, iterations, zero_radius, margin, norm):
    """Search of (scale, integer zero point) for slices x (rows, groups, n) with qparams (rows, groups, 1)."""
    best = _Best(x, s, z, args, margin, norm)
    sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
    extents = _extents(x, s)
    starts: List[Tuple[torch.Tensor, torch.Tensor]] = [(s, z)]
    radius = 0 if args.symmetric or args.float_zero_point else zero_radius
    for dz in range(-radius, radius + 1):
        cz = (z + dz).clamp(args.qmin, args.qmax)
        finest = _finest(extents, cz, args, margin)
        starts.append((torch.where(torch.isfinite(finest) & (finest > 0), rs(sign * finest), s), cz))
    for cs, cz in starts:
        q = best.offer(cs, cz)
        for _ in range(iterations):
            cs, cz = _refit(x, q, cs, cz, sign, extents, args, rs, margin)
            q = best.offer(cs, cz)
    return best.s, best.z


def _refit(x, q, s, z, sign, extents, args, rs, margin):
    """Least-squares (scale, zero point) for fixed codes q: the zero point rounded to an integer or, for float zero
    points, to its float16 storage (asymmetric only),
    the scale refitted for it, kept at least as coarse as the no-clipping limit and with its sign."""
    if not args.symmetric:  # x ≈ s·q + c: regression of x on the codes, then z = −c/s rounded
        qm, xm = q.mean(-1, keepdim=True), x.mean(-1, keepdim=True)
        qc = q - qm
        var = qc.square().sum(-1, keepdim=True)
        slope = (qc * (x - xm)).sum(-1, keepdim=True) / var
        zf = qm - xm / slope
        ok = (var > 0) & torch.isfinite(zf) & (slope * sign > 0)
        zf = torch.where(ok, zf, z)
        z = torch.where(ok, stored_zero_point(zf, args) if args.float_zero_point else
                        torch.round(zf).clamp(args.qmin, args.qmax), z)
    d = q - z
    den = d.square().sum(-1, keepdim=True)
    fit = (x * d).sum(-1, keepdim=True) / den
    ok = (den > 0) & torch.isfinite(fit) & (fit * sign > 0)
    magnitude = torch.maximum(torch.where(ok, fit.abs(), s.abs()), _finest(extents, z, args, margin))
    return torch.where(torch.isfinite(magnitude), rs(sign * magnitude), s), z


def optimize_zero_points(weight: torch.Tensor, args: QuantArgs, init: Tuple[torch.Tensor, torch.Tensor],
                         iterations: int = 20, lp_norm: float = 0.7, beta: float = 10.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float zero points for `weight` (out, in) with the scales of `init` kept (HQQ's zero-only optimisation).

    Start: the initial zero point rounded to an integer. Step: codes q for the current zero point; the error
    e = w − ŵ shrunk towards 0 by the lp proximal operator (p = `lp_norm` < 1 keeps only large errors, which the
    zero point then ignores); the new zero point per slice is mean(q − (w − shrunk e) / s), as float16 stores it.
    Stops as soon as the whole tensor's mean |w − ŵ| does not fall, returning the best zero points seen. Row
    chunks bound the memory; the stopping test is global, as in HQQ.
    """
    if not args.float_zero_point:
        raise ValueError("optimize_zero_points needs QuantArgs.float_zero_point=True (integer zero points: use "
                         "optimize_qparams)")
    if args.strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"optimize_zero_points handles weight strategies tensor, channel and group, not {args.strategy!r}")
    if iterations < 0 or not 0 < lp_norm <= 1 or beta <= 0:
        raise ValueError(f"need iterations >= 0, 0 < lp_norm <= 1 and beta > 0; got iterations={iterations}, "
                         f"lp_norm={lp_norm}, beta={beta}")
    from .primitives import _broadcast

    w = weight.detach()
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale = torch.as_tensor(init[0])
    zero = stored_zero_point(torch.round(torch.broadcast_to(torch.as_tensor(init[1]), scale.shape)), args)
    whole = args.strategy == "tensor" or w.dim() != 2
    step = max(1, CHUNK_ELEMENTS // max(1, w.shape[-1])) if not whole else max(1, w.shape[0])

    def passes(z):
        """(rows a:b, their x/s, codes, s, z) per row chunk, qparams broadcast as `quantize` does."""
        for a in range(0, w.shape[0] if w.dim() else 1, step):
            b = a + step
            pick = (lambda p: p) if whole else (lambda p: p[a:b])
            xv, s, zz = _broadcast(w[a:b].to(work) if w.dim() else w.to(work), pick(scale), pick(z), args, work)
            yield a, b, xv, torch.div(xv, s).add_(zz).round_().clamp_(args.qmin, args.qmax), s, zz

    def error_of(z) -> float:
        return sum(float(q.sub_(zz).mul_(s).sub_(xv).abs_().sum()) for _, _, xv, q, s, zz in passes(z)) / max(1, w.numel())

    def updated(z):
        new = torch.empty_like(z)
        for a, b, xv, q, s, zz in passes(z):
            e = xv - (q - zz) * s
            magnitude = e.abs()
            shrunk = torch.sign(e) * torch.relu(magnitude - magnitude.pow(lp_norm - 1) / beta)
            target = q - (xv - shrunk) / s  # the zero point that would make each shrunk error's slice mean 0
            mean = lambda t: t.mean(-1, keepdim=True)  # noqa: E731
            if whole:
                new = reduce_by_strategy(target.reshape(w.shape), args, mean).reshape(z.shape)
            else:
                rows = min(b, w.shape[0]) - a
                new[a:b] = reduce_by_strategy(target.reshape(rows, -1), args, mean).reshape(new[a:b].shape)
        return stored_zero_point(new, args)

    best, best_error = zero, error_of(zero)
    for _ in range(iterations):
        zero = updated(zero)
        err = error_of(zero)
        if not err < best_error:
            break
        best, best_error = zero, err
    return scale, best
