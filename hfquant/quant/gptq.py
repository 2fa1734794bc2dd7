"""GPTQ: quantize a weight one input column at a time, spreading each column's rounding error onto the columns
not yet quantized so that the layer's output on the calibration inputs changes as little as possible.

The Hessian H = (2/N) Σ x xᵀ of the layer's inputs measures how much each pair of input columns matters. Its
inverse, factored once as an upper Cholesky matrix U (H⁻¹ = Uᵀ U), gives the optimal update of the remaining
columns after each rounding (Frantar et al., 2022). Updates are applied lazily: inside a block of columns
one row of U at a time, to the rest of the matrix once per block (one matrix product instead of many).

Act-order processes the columns with the largest diag(H) (the most active inputs) first, while their error can
still be absorbed by many others. The groups stay the plain consecutive ones (their qparams are computed up
front from the weight), so the saved format needs no column index — only the processing order changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .args import QuantArgs
from .primitives import quantize

QParams = Tuple[torch.Tensor, torch.Tensor]
#: (values, args) → (scale, zero point) shaped for args.strategy, scales already rounded as they will be stored
QParamsFn = Callable[[torch.Tensor, QuantArgs], QParams]

#: each failed Cholesky factorisation multiplies the damping by this, at most `DAMPING_RETRIES` times
DAMPING_GROWTH = 10.0
DAMPING_RETRIES = 4


class HessianError(ValueError):
    """The Hessian cannot be inverted (not positive definite even with the largest damping tried)."""


@dataclass
class PreparedHessian:
    """What GPTQ needs from a Hessian, computed once and shared by every weight that reads the same input."""

    hinv: torch.Tensor  # (in, in) upper Cholesky factor of the damped inverse, in processing order
    perm: Optional[torch.Tensor]  # processing order of the input columns (None: natural order)
    dead: torch.Tensor  # (in,) bool: inputs that were always zero — their weight columns do not matter
    damping: float  # the damping finally added to the diagonal


def prepare_hessian(hessian: torch.Tensor, dampening: float = 0.01, act_order: bool = True) -> PreparedHessian:
    """Dead inputs masked, columns ordered, diagonal damped by `dampening`·mean(diag H), inverse factored.

    A failed factorisation is retried in float64, then with ten times the damping (float32 first again), a few
    times, before `HessianError`. Float32 is what the updates use and almost always factors; float64 rescues
    ill-conditioned Hessians (few calibration tokens) at twice the cost, so it is only tried when needed.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {tuple(hessian.shape)}")
    h = hessian.detach().to(torch.float32)
    if not bool(torch.isfinite(h).all()):
        raise HessianError("the Hessian contains NaN or Inf (the calibration inputs of this layer are not finite)")
    diag = h.diagonal()
    if bool((diag < 0).any()):
        raise HessianError("the Hessian has negative diagonal entries, so it is not (2/N) Σ x xᵀ of real inputs")
    dead = diag == 0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    del diag
    if perm is not None:
        hessian = None  # the permuted copy replaces it (freed here when the caller handed over its only reference)
        h = h[perm[:, None], perm]
    base = h.diagonal().clone()
    base[dead[perm] if perm is not None else dead] = 1.0  # a dead input: any positive value keeps H invertible
    mean_diag = float(base.mean())
    damping = dampening * mean_diag
    for _ in range(DAMPING_RETRIES + 1):
        for dtype in (torch.float32, torch.float64):
            hinv = _inverse_cholesky(h.to(dtype), base.to(dtype) + damping)
            if hinv is not None:
                return PreparedHessian(hinv.to(torch.float32), perm, dead, damping)
        damping *= DAMPING_GROWTH
    raise HessianError(
        f"the Hessian is not positive definite even with damping {damping / DAMPING_GROWTH:.3g} "
        f"({DAMPING_RETRIES} retries from dampening={dampening} × mean(diag H)={mean_diag:.3g})"
    )


def _inverse_cholesky(h: torch.Tensor, diagonal: torch.Tensor) -> Optional[torch.Tensor]:
    """Upper U with Uᵀ U = h⁻¹ (h's diagonal replaced by `diagonal`), or None when that is not (numerically)
    positive definite."""
    work = h.clone() if h.dtype == torch.float32 else h
    work.diagonal().copy_(diagonal)
    lower, info = torch.linalg.cholesky_ex(work)
    del work  # at most three in×in matrices alive at once (h, and two steps of the factorisation)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def gptq_quantize(
    weight: torch.Tensor,
    hessian: PreparedHessian,
    args: QuantArgs,
    qparams_for: QParamsFn,
    block_size: int = 128,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero point) of `weight` (out, in), shaped as hfquant stores them for `args.strategy`.

    Tensor, channel and (with act-order) group qparams come from the whole weight before any update; without
    act-order each group's qparams come from its error-updated columns when the group is reached (classic GPTQ).
    The codes are exactly ``quantize(updated weight, scale, zero_point, args)``.
    """
    return gptq_quantize_shared([weight], hessian, args, [qparams_for], block_size)[0]


def gptq_quantize_shared(
    weights: Sequence[torch.Tensor],
    hessian: PreparedHessian,
    args: QuantArgs,
    qparams_for: Sequence[QParamsFn],
    block_size: int = 128,
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`gptq_quantize` of several weights that read the same input (q/k/v, gate/up) in one pass.

    Rows of a weight never interact in GPTQ — each only sees its own errors through the shared H⁻¹ — so the
    weights are stacked row-wise and their columns walked once: the per-column work is a few vector operations
    whose cost is mostly fixed, and it is paid once instead of once per weight. Qparams stay per weight.
    """
    columns = hessian.hinv.shape[0]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != columns:
            raise ValueError(f"weight shape {tuple(w.shape)} does not match a Hessian of {columns} input columns")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    work = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    grouped = args.strategy == "group"
    static = not grouped or hessian.perm is not None
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    # the work matrix is transposed (columns × stacked rows): each column's vector operations are contiguous
    device = weights[0].device
    perm = None if hessian.perm is None else hessian.perm.to(device)
    wt = torch.cat([w.detach().t().to(device=device, dtype=work) for w in weights], dim=1)
    wt[hessian.dead.to(device)] = 0.0  # an input that is always zero: its weights never reach the output
    qparams: List[List[QParams]] = [[] for _ in weights]  # per weight: its (scale, zp), or one pair per group
    if static:
        for k, fn in enumerate(qparams_for):
            qparams[k].append(fn(wt[:, bounds[k]:bounds[k + 1]].t(), args))
    if perm is not None:
        wt = wt[perm]
    has_zero = not (args.symmetric and args.signed)  # symmetric signed: every zero point is 0, skip adding it
    float_zero = args.float_zero_point
    if static:  # (qparam set, stacked rows) tables and each column's set; a block's (column, row) values on demand
        scale_t, zero_t = (torch.cat([_stacked_qparam(q[0][j], args, work, bounds[k + 1] - bounds[k])
                                      for k, q in enumerate(qparams)], dim=1) if j == 0 or has_zero else None
                           for j in (0, 1))
        column_set = _column_sets(args, perm, columns, device)
    hinv = hessian.hinv.to(device=device, dtype=work)
    group_args = args.replace(strategy="channel", group_size=None) if grouped else args
    qmin, qmax = args.qmin, args.qmax
    s = z = None
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = wt[i1:i2].clone()
        errors = torch.empty_like(block)
        hblock = hinv[i1:i2, i1:i2]
        inv_diag = (-1.0 / hblock.diagonal()).tolist()
        xs, es, hrows = block.unbind(0), errors.unbind(0), hblock.unbind(0)
        if static:
            ss = scale_t[column_set[i1:i2]].unbind(0)
            zs = zero_t[column_set[i1:i2]].unbind(0) if has_zero else ss
        for i in range(i2 - i1):
            if static:
                s, z = ss[i], zs[i]
            elif (i1 + i) % args.group_size == 0:  # a group starts: its qparams from its updated columns
                s, z = _group_qparams(wt, block, errors, hinv, i1, i2, i, args.group_size, bounds, qparams,
                                      qparams_for, group_args, work)
            x, e = xs[i], es[i]
            # x̂ with the same arithmetic as `quantize` / `dequantize`: x/s rounded half-to-even, + z, clamped
            torch.div(x, s, out=e)
            if float_zero:  # round(x/s + z): the zero point is not an integer
                e.add_(z).round_().clamp_(qmin, qmax).sub_(z)
            elif has_zero:
                e.round_().add_(z).clamp_(qmin, qmax).sub_(z)
            else:
                e.round_().clamp_(qmin, qmax)
            e.mul_(s).sub_(x).mul_(inv_diag[i])  # (x − x̂) / U_ii
            if i + 1 < i2 - i1:
                block[i + 1:].addr_(hrows[i][i + 1:], e, alpha=-1.0)
        wt[i1:i2] = block  # the values just before rounding: their codes are the result
        if i2 < columns:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), errors, alpha=-1.0)
    if perm is not None:
        wt = wt[torch.argsort(perm)]
    results = []
    for k in range(len(weights)):
        if static:
            scale, zero_point = qparams[k][0]
        else:
            scale, zero_point = (torch.cat([q[j] for q in qparams[k]], dim=1) for j in (0, 1))
        results.append((quantize(wt[:, bounds[k]:bounds[k + 1]].t(), scale, zero_point, args), scale, zero_point))
    return results


def _group_qparams(wt, block, errors, hinv, i1, i2, i, group_size, bounds, qparams, qparams_for, group_args, work):
    """Qparams of the group starting at column i1 + i from its current values (updates still pending beyond
    the block added), recorded per weight; returned as one value per stacked row."""
    start, end = i1 + i, min(i1 + i + group_size, wt.shape[0])
    current = block[i:end - i1]
    if end > i2:  # the group reaches past the block
        rest = wt[i2:end] - hinv[i1:start, i2:end].t() @ errors[:i]
        current = torch.cat([current, rest], dim=0)
    scales, zeros = [], []
    for k, fn in enumerate(qparams_for):
        gs, gz = (p.reshape(-1, 1) for p in fn(current[:, bounds[k]:bounds[k + 1]].t(), group_args))
        qparams[k].append((gs, gz))
        scales.append(gs[:, 0])
        zeros.append(gz[:, 0])
    return torch.cat(scales).to(work), torch.cat(zeros).to(work)


def _stacked_qparam(p: torch.Tensor, args: QuantArgs, work: torch.dtype, rows: int) -> torch.Tensor:
    """A weight's qparam as a (sets, rows) table: one set per group (group strategy), else a single set."""
    p = p.to(work)
    if p.dim() == 0:
        return p.expand(1, rows)
    if args.strategy == "group":
        return p.reshape(rows, -1).t()
    return p.reshape(1, rows)


def _column_sets(args: QuantArgs, perm: Optional[torch.Tensor], cols: int, device) -> torch.Tensor:
    """For each column in processing order, the row of the qparam table it uses (its group, or 0)."""
    if args.strategy != "group":
        return torch.zeros(cols, dtype=torch.long, device=device)
    index = torch.arange(cols, device=device) // args.group_size
    return index[perm] if perm is not None else index
