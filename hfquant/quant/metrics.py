"""Quantization error metrics between a tensor and its reconstruction."""

from __future__ import annotations

import math

import torch


def _pair(x: torch.Tensor, xh: torch.Tensor):
    if x.shape != xh.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(xh.shape)}")
    work = torch.float64
    return x.to(work), xh.to(work)


def mse(x: torch.Tensor, xh: torch.Tensor) -> float:
    """Mean squared error."""
    a, b = _pair(x, xh)
    return float(((a - b) ** 2).mean())


def max_abs_error(x: torch.Tensor, xh: torch.Tensor) -> float:
    """Largest absolute elementwise error."""
    a, b = _pair(x, xh)
    return float((a - b).abs().max())


def sqnr_db(x: torch.Tensor, xh: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σx² / Σ(x−x̂)²); +inf when exact."""
    a, b = _pair(x, xh)
    noise = float(((a - b) ** 2).sum())
    signal = float((a**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
