"""Data-free error minimisation of scales and zero points (HQQ-style), for integer zero points. DRAFT."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .args import QuantArgs

RoundScale = Callable[[torch.Tensor], torch.Tensor]
CHUNK_ELEMENTS = 1 << 18


def optimize_qparams(weight, args, init, iterations=20, round_scale=None, norm=0.7, beta=10.0, kappa=1.01,
                     select=2.0, zero_radius=1, starts=(1.0,), fit="joint", clip=None, tight=0):
    scale0, zp0 = init
    rs = round_scale or (lambda s: s)
    w = weight.detach()
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale = torch.as_tensor(scale0).to(work).clone()
    zp = torch.as_tensor(zp0).to(torch.int32).clone()
    opts = dict(iterations=iterations, rs=rs, norm=norm, beta=beta, kappa=kappa, select=select,
                zero_radius=zero_radius, starts=starts, fit=fit, clip=clip, tight=tight)
    if args.strategy == "tensor":
        x = w.reshape(1, 1, -1).to(work)
        s, z = _solve(x, scale.reshape(1, 1, 1), zp.reshape(1, 1, 1).to(work), args, **opts)
        return s.reshape(scale.shape), z.to(torch.int32).reshape(zp.shape)
    rows = w.shape[0]
    w2 = w.reshape(rows, -1)
    cols = w2.shape[1]
    s2 = scale.reshape(rows, -1)
    z2 = zp.reshape(rows, -1)
    g = args.group_size if args.strategy == "group" else cols
    full = (cols // g) * g
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        if full:
            ng = cols // g
            x = w2[a:b, :full].to(work).reshape(b - a, ng, g)
            s, z = _solve(x, s2[a:b, :ng].unsqueeze(-1), z2[a:b, :ng].unsqueeze(-1).to(work), args, **opts)
            s2[a:b, :ng] = s.squeeze(-1)
            z2[a:b, :ng] = z.squeeze(-1).to(torch.int32)
        if full < cols:
            x = w2[a:b, full:].to(work).unsqueeze(1)
            s, z = _solve(x, s2[a:b, -1:].unsqueeze(-1), z2[a:b, -1:].unsqueeze(-1).to(work), args, **opts)
            s2[a:b, -1:] = s.squeeze(-1)
            z2[a:b, -1:] = z.squeeze(-1).to(torch.int32)
    return s2.reshape(scale.shape), z2.reshape(zp.shape)


def _codes(x, s, z, args):
    return torch.round(x / s).add_(z).clamp_(args.qmin, args.qmax)


def _err(x, s, z, q, p, bound=None, clip=None):
    d = (q - z).mul_(s).sub_(x).abs_()
    m = d.amax(-1, keepdim=True)
    if p != 1:
        d.pow_(p)
    e = d.sum(-1, keepdim=True)
    if clip is not None and bound is not None:
        e = torch.where(m <= torch.maximum(bound, clip * s.abs()) * (1 + 1e-6), e, torch.full_like(e, float("inf")))
    return e


def _shrink(e, beta, p):
    a = e.abs()
    if p == 1:
        return torch.sign(e) * torch.relu(a - 1.0 / beta)
    return torch.sign(e) * torch.relu(a - (1.0 / beta) * (a + 1e-8).pow(p - 1))


def _solve(x, s, z, args, iterations, rs, norm, beta, kappa, select, zero_radius, starts, fit, clip, tight):
    opt_zero = not args.symmetric
    best_s, best_z = s.clone(), z.clone()
    q0 = _codes(x, s, z, args)
    bound = (q0 - z).mul_(s).sub_(x).abs_().amax(-1, keepdim=True)
    best_e = _err(x, s, z, q0, select)
    E = lambda x, s, z, q, p: _err(x, s, z, q, p, bound, clip)
    cands = [(rs(s * c), z) for c in starts]
    if tight and opt_zero:
        cands += tight_starts(x, s, z, args, rs, tight)
    for cs, cz in cands:
        b = beta
        for _ in range(iterations):
            q = _codes(x, cs, cz, args)
            e = E(x, cs, cz, q, select)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, cs, best_s)
            best_z = torch.where(better, cz, best_z)
            t = x
            if norm < 2:
                t = x - _shrink(x - (q - cz) * cs, b, norm)
            b *= kappa
            if opt_zero and fit == "joint":
                qm = q.mean(-1, keepdim=True)
                tm = t.mean(-1, keepdim=True)
                qc = q - qm
                var = (qc * qc).sum(-1, keepdim=True)
                a_ = (qc * (t - tm)).sum(-1, keepdim=True) / var
                nz = qm - tm / a_
                ok = (var > 0) & torch.isfinite(nz) & (a_ * cs > 0)
                cz = torch.where(ok, torch.round(nz).clamp(args.qmin, args.qmax), cz)
            elif opt_zero and fit == "zero":
                nz = (q - t / cs).mean(-1, keepdim=True)
                cz = torch.round(nz).clamp(args.qmin, args.qmax)
            if fit != "zero":
                d = q - cz
                den = (d * d).sum(-1, keepdim=True)
                ns = rs((t * d).sum(-1, keepdim=True) / den)
                ok = (den > 0) & torch.isfinite(ns) & (ns * cs > 0)
                cs = torch.where(ok, ns, cs)
        q = _codes(x, cs, cz, args)
        e = E(x, cs, cz, q, select)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, cs, best_s)
        best_z = torch.where(better, cz, best_z)
    if opt_zero and zero_radius:
        base_z = best_z.clone()
        for dz in range(-zero_radius, zero_radius + 1):
            if dz == 0:
                continue
            cz = (base_z + dz).clamp(args.qmin, args.qmax)
            q = _codes(x, best_s, cz, args)
            d = q - cz
            den = (d * d).sum(-1, keepdim=True)
            ns = rs((x * d).sum(-1, keepdim=True) / den)
            ok = (den > 0) & torch.isfinite(ns) & (ns * best_s > 0)
            ns = torch.where(ok, ns, best_s)
            for cs in (best_s, ns):
                e = E(x, cs, cz, _codes(x, cs, cz, args), select)
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_s = torch.where(better, cs, best_s)
                best_z = torch.where(better, cz, best_z)
    return best_s, best_z


def tight_starts(x, s, z, args, rs, radius=1):
    """(scale, zero) candidates: for each integer zero near z, the smallest same-sign scale that keeps the group's
    extremes within half a step of the grid."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    out = []
    for dz in range(-radius, radius + 1):
        cz = (z + dz).clamp(args.qmin, args.qmax)
        top = args.qmax - cz + 0.5  # hi/s <= top
        bot = args.qmin - cz - 0.5  # lo/s >= bot (bot < 0)
        cand = torch.maximum(hi.clamp(min=0) / top.clamp(min=0.5), lo.clamp(max=0) / bot.clamp(max=-0.5))
        cand = torch.where(cand > 0, cand, s)
        out.append((rs(cand * 1.0001), cz))
    return out
