"""Range clipping by output error: per (row, group), the shrink r of the weight range [r·min, r·max] whose
quantized weights change the layer's output least on calibration inputs.

Why: min-max ranges spend levels on a few large weights; clipping them costs those weights accuracy but gives
every other weight of the group a finer step. Weight error alone over-clips (the `mse` observer measured worse out
of domain); weighting the error by the inputs' second moments asks what the output sees. After AWQ's clipping
search (Lin et al., 2023), with the run's own quantizer.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from .args import QuantArgs
from .primitives import expand_qparam
from .qparams import min_max


def group_slices(in_features: int, group_size: int) -> List[slice]:
    """Column slices of the quantization groups (the last one ragged when group_size does not divide in_features)."""
    return [slice(start, min(start + group_size, in_features)) for start in range(0, in_features, group_size)]


def shrink_ratios(grid: int, smallest: float) -> List[float]:
    """1.0 (no clipping) first, then `grid` - 1 steps down to `smallest`."""
    if grid < 2:
        return [1.0]
    return [1.0 - (1.0 - smallest) * i / (grid - 1) for i in range(grid)]


@torch.no_grad()
def clip_by_output_error(weight: torch.Tensor, gram: torch.Tensor, args: QuantArgs,
                         fake_quant: Callable[[torch.Tensor], torch.Tensor], grid: int = 20,
                         smallest: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clipped weight, chosen ratio per (row, group)). `gram` = XᵀX of the Linear's inputs (in, in); a row-group's
    error for a ratio is δ G_g δᵀ with δ its quantized-minus-original weights and G_g the group's diagonal block
    (cross-group terms ignored, as each (row, group) picks its own ratio). Ratio 1.0 is always a candidate, so no
    (row, group) ends with a larger error on these inputs than min-max. Groups are `args`' (a channel-wise scheme:
    one per row)."""
    w = weight.float()
    slices = group_slices(w.shape[1], args.group_size if args.strategy == "group" else w.shape[1])
    lo, hi = min_max(w, args)  # (out, groups), the ragged last group included
    blocks = [gram[s, s].float() for s in slices]
    best_err = torch.full_like(lo, float("inf"))
    best_ratio = torch.ones_like(lo)
    for ratio in shrink_ratios(grid, smallest):
        clamped = _clamp_groups(w, lo * ratio, hi * ratio, args)
        delta = fake_quant(clamped).float() - w
        err = torch.stack([((delta[:, s] @ g) * delta[:, s]).sum(1) for s, g in zip(slices, blocks)], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return _clamp_groups(w, lo * best_ratio, hi * best_ratio, args).to(weight.dtype), best_ratio


def _clamp_groups(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """w clamped to per-group bounds, spread over each group's columns as scales are."""
    return torch.clamp(w, expand_qparam(lo, w, args), expand_qparam(hi, w, args))
