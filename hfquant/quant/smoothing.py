"""Per-input-channel scale math for weight editors (AWQ-style search, SmoothQuant); pure functions of tensors.

A smoothing scale `s` (one positive value per input channel of a group of Linears that read the same input)
is applied as ``W' = W · diag(s)`` and ``X' = X · diag(1/s)`` (the division is folded into whatever produced
X), so ``X' W'^T = X W^T`` in exact arithmetic. What changes is how well `W'` and `X'` quantize.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

#: floor for activation / weight statistics, so a channel that never fired gets a finite, tiny scale
EPS = 1e-5


def alpha_grid(points: int) -> List[float]:
    """`points` migration strengths i/points in [0, 1); α = 0 is first and means "no scaling"."""
    if points < 1:
        raise ValueError(f"grid must be >= 1, got {points}")
    return [i / points for i in range(points)]


def coarse_to_fine_argmin(points: int, cost: Callable[[int], float], coarse: int = 5) -> Tuple[int, float, int]:
    """(index in range(points) with the smallest `cost`, that cost, how many points were evaluated) without
    evaluating them all: every step-th point first (the largest power-of-two step that leaves at least `coarse`
    points; `coarse=points` evaluates every point), then the neighbours at half the step around the best so far,
    down to step 1. It finds the grid's minimum whenever the cost has a single strict minimum and falls on both
    sides of it (a flat stretch can stop it early, since ties go to the lower index). AWQ's error along α measured
    so: the same α as the full 20-point grid in all 90 groups of the embedded model, evaluating at most 9 of the
    20 (docs/benchmarks.md, "Default run wall time"). A NaN cost loses to any other, +inf included."""
    if points < 1 or coarse < 1:
        raise ValueError(f"points and coarse must be >= 1, got points={points}, coarse={coarse}")
    step = 1
    while points // (step * 2) >= coarse:
        step *= 2
    seen = {}

    def key(i: int):
        if i not in seen:
            seen[i] = cost(i)
        value = seen[i]
        return (1, 0.0, i) if value != value else (0, value, i)

    best = min(range(0, points, step), key=key)
    while step > 1:
        step //= 2
        best = min((i for i in (best - step, best, best + step) if 0 <= i < points), key=key)
    return best, seen[best], len(seen)


def awq_scales(act_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ candidate: s = mean|x|^α, normalised by √(max·min) so scales sit around 1 (the geometric middle
    keeps both W·s and X/s in a range float32 represents comfortably). α = 0 gives exactly ones."""
    s = act_mean_abs.float().clamp(min=EPS).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def smoothquant_scales(act_max_abs: torch.Tensor, weight_max_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1-α), which equalises the per-channel ranges of X/s and W·s
    at α = 0.5; larger α moves more of the activations' range into the weights."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_max_abs.float().clamp(min=EPS).pow(alpha)
    w = weight_max_abs.float().clamp(min=EPS).pow(1.0 - alpha)
    return (a / w).clamp(min=EPS)


def column_max_abs(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over every weight of a group (they share the input channels j)."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def error_basis(rows: torch.Tensor) -> torch.Tensor:
    """B with BᵀB = XᵀX for sample rows X (n, in): X itself when n <= in, else the (in, in) R of X = QR (in
    float64). Then ‖X Δᵀ‖² = ‖B Δᵀ‖², at the cost of min(n, in) rows per evaluation."""
    if rows.shape[0] <= rows.shape[1]:
        return rows.float()
    return torch.linalg.qr(rows.double(), mode="r").R.float()


def output_error(delta: torch.Tensor, basis: torch.Tensor) -> float:
    """Σ‖X Δᵀ‖²: the squared output error a weight error Δ (out, in) causes on the rows behind `basis`."""
    return float((delta.float() @ basis.T).pow(2).sum())


def scaled_quant_delta(weight: torch.Tensor, s: torch.Tensor,
                       fake_quant: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Δ = Q(W·s)/s − W: the effective weight error when W is scaled by `s` before quantizing and its input
    divided by `s` (`fake_quant` quantizes and dequantizes with the run's range choice)."""
    w = weight.float()
    return fake_quant(w * s) / s - w
