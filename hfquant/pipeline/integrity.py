"""Checks of what is loaded, before minutes of work depend on it: every weight finite (named when not), the
baseline's own metrics finite. NaN/Inf found late surface as "the saved model does not reproduce" or a NaN
perplexity, which point at the wrong culprit."""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch

from ..errors import HfquantError


class NonFiniteError(HfquantError, ValueError):
    """A weight, or the unquantized model's output, holds NaN or Inf."""


def is_finite(t: torch.Tensor) -> bool:
    """Max and min propagate NaN and show ±Inf: two reductions decide it without a bool copy of the tensor."""
    if t.numel() == 0 or not t.is_floating_point() or t.device.type == "meta":
        return True
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def count_nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def nonfinite_message(bad: list, where: str) -> str:
    shown = ", ".join(f"{name} ({n} of {numel} values)" for name, n, numel in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"{where} has NaN or Inf in {len(bad)} tensor(s): {shown}{more}. Quantizing cannot fix broken weights: "
            "re-download or re-export the checkpoint (check the run that produced it for overflow, e.g. float16 "
            "training without loss scaling)")


def check_finite_tensors(named: Iterable[Tuple[str, torch.Tensor]], where: str) -> None:
    """Raise `NonFiniteError` naming every tensor with NaN/Inf (shared storage checked once)."""
    bad, seen = [], set()
    for name, t in named:
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        if not is_finite(t):
            bad.append((name, count_nonfinite(t), t.numel()))
    if bad:
        raise NonFiniteError(nonfinite_message(bad, where))


def check_model_finite(model: torch.nn.Module, where: str) -> None:
    """Every parameter and buffer of a loaded model (one pass of two reductions per tensor)."""
    check_finite_tensors(list(model.named_parameters()) + list(model.named_buffers()), where)


def check_baseline_finite(baseline: dict) -> None:
    """The unquantized model's metrics: NaN here means the model itself is broken on this text, and every
    comparison with the quantized model would be meaningless."""
    for evaluator, metrics in baseline.items():
        for key, value in metrics.items():
            if isinstance(value, float) and not key.startswith("_") and not math.isfinite(value):
                raise NonFiniteError(
                    f"the unquantized model's {evaluator} {key} is {value} on the evaluation text: its logits hold NaN "
                    "or Inf, so no quantized result could be compared with it. Check the model (e.g. model.dtype="
                    "float32 instead of float16, whose range can overflow) before quantizing it")
