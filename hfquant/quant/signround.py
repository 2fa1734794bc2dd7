"""SignRound's math: weights fake-quantized with a learnable rounding offset and range shrink, differentiably.

Round-to-nearest picks each code from the weight alone. SignRound (Cheng et al., 2023, the method behind Intel's
AutoRound) instead learns, per weight, an offset v ∈ [-½, ½] added before rounding (so a code may round the other
way) and, per scale, a factor a ∈ [a_min, 1] that shrinks the range (for an asymmetric range learning its zero point,
one factor per end) — all by signed gradient descent on how far a decoder layer's output moves from its targets (the
float layer's, or the float model's). Rounding and clamping pass gradients straight through
(the straight-through estimator), so the offsets see the output error of every code they could flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .args import QuantArgs
from .primitives import code_dtype, expand_qparam
from .qparams import stored_zero_point as float_zero_point_as_stored


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


@dataclass
class RoundingState:
    """One weight's learnable rounding around the observer's qparams: `offset` per weight, `shrink` per scale and,
    when the zero point is learnt too, `shrink_low` per scale: the range's upper end shrinks by `shrink`, its lower
    end by `shrink_low` (AutoRound's rule for asymmetric schemes), which moves the zero point."""

    weight: torch.Tensor  # float32, (out, in); not trained
    scale: torch.Tensor  # the observer's scale (per tensor / row / group)
    zero_point: torch.Tensor
    args: QuantArgs
    offset: torch.Tensor  # v, same shape as weight, in [-0.5, 0.5]
    shrink: torch.Tensor  # a, same shape as scale, in [min_shrink, 1]
    round_scale: Callable[[torch.Tensor], torch.Tensor] = lambda s: s  # how the backend stores scales
    shrink_low: Optional[torch.Tensor] = None  # asymmetric schemes learning the zero point; else both ends shrink alike

    @classmethod
    def start(cls, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs,
              round_scale: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
              learn_zero_point: bool = False) -> "RoundingState":
        """v = 0 and a = 1: exactly round-to-nearest with the observer's qparams (`scale` already rounded).
        `learn_zero_point` applies to asymmetric args only (a symmetric zero point is fixed by the format)."""
        w = weight.detach().to(torch.float32)
        s = torch.as_tensor(scale).detach().to(torch.float32)
        low = torch.ones_like(s, requires_grad=True) if learn_zero_point and not args.symmetric else None
        return cls(w, s, torch.as_tensor(zero_point).detach().to(torch.float32), args,
                   torch.zeros_like(w, requires_grad=True), torch.ones_like(s, requires_grad=True), round_scale, low)

    def _learnt_qparams(self):
        """(scale, zero point) before storage rounding, differentiable in the shrinks. Both ends shrinking alike keep
        the zero point; with `shrink_low`, the range [lo, hi] = [(qmin − z)·s, (qmax − z)·s] becomes [a_lo·lo, a_hi·hi],
        written so that a_lo = a_hi = 1 gives s and z exactly (no float rounding at the start)."""
        if self.shrink_low is None:
            return self.scale * self.shrink, self.zero_point
        qmin, qmax, z = self.args.qmin, self.args.qmax, self.zero_point
        up, down = (qmax - z) / (qmax - qmin), (qmin - z) / (qmax - qmin)  # hi and lo in units of the range
        factor = 1 + (self.shrink - 1) * up - (self.shrink_low - 1) * down  # new range / old range
        return self.scale * factor, z + (qmin - z) * (1 - self.shrink_low / factor)

    def _zero_as_stored(self, zero_point: torch.Tensor) -> torch.Tensor:
        """A learnt zero point as the format stores it (rounded integer, or float16 for float zero points)."""
        if self.args.float_zero_point:
            return float_zero_point_as_stored(zero_point, self.args)
        return torch.round(zero_point).clamp(self.args.qmin, self.args.qmax)

    def stored_scale(self) -> torch.Tensor:
        """The scale as it will be saved: the learnt one through the backend's rounding."""
        with torch.no_grad():
            return self.round_scale(self._learnt_qparams()[0]).to(torch.float32)

    def stored_zero_point(self) -> torch.Tensor:
        """The zero point as it will be saved (the observer's unless learnt), as float32."""
        with torch.no_grad():
            if self.shrink_low is None:
                return self.zero_point
            return self._zero_as_stored(self._learnt_qparams()[1])

    def parameters(self):
        return (self.offset, self.shrink) + (() if self.shrink_low is None else (self.shrink_low,))

    def fake_quantized(self) -> torch.Tensor:
        """ŵ = s·(clamp(round(w/s + v) + z) − z) with the learnt s (a·s₀) and z as stored (the backend's scale
        rounding and the format's zero point storage, straight through) — the very weight `codes`, `stored_scale`
        and `stored_zero_point` dequantize to; differentiable in v and the shrinks."""
        scale, zero_point = self._learnt_qparams()
        if self.shrink_low is not None:  # the stored zero point, straight through
            zero_point = zero_point + (self._zero_as_stored(zero_point.detach()) - zero_point).detach()
        stored = self.round_scale(scale.detach()).to(torch.float32)  # = stored_scale(), without computing it again
        s = expand_qparam(scale + (stored - scale).detach(), self.weight, self.args)
        z = expand_qparam(zero_point, self.weight, self.args)
        y = self.weight / s + self.offset
        if self.args.float_zero_point:
            q = torch.clamp(_round_ste(y + z), self.args.qmin, self.args.qmax)
        else:
            q = torch.clamp(_round_ste(y) + z, self.args.qmin, self.args.qmax)
        return (q - z) * s

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The integer codes at `stored_scale()`, with the learnt offsets."""
        s = expand_qparam(self.stored_scale(), self.weight, self.args)
        z = expand_qparam(self.stored_zero_point().to(torch.float32), self.weight, self.args)
        y = self.weight / s + self.offset
        q = torch.round(y + z) if self.args.float_zero_point else torch.round(y) + z
        return q.clamp_(self.args.qmin, self.args.qmax).to(code_dtype(self.args))

    @torch.no_grad()
    def signed_step(self, lr: float, min_shrink: float) -> None:
        """v ← v − lr·sign(∂L/∂v), a likewise, each clamped to its range; gradients cleared."""
        for p, low, high in ((self.offset, -0.5, 0.5), (self.shrink, min_shrink, 1.0), (self.shrink_low, min_shrink, 1.0)):
            if p is not None and p.grad is not None:
                p.sub_(p.grad.sign(), alpha=lr).clamp_(low, high)
                p.grad = None

    def snapshot(self):
        return tuple(p.detach().clone() for p in self.parameters())

    @torch.no_grad()
    def restore(self, snapshot) -> None:
        for p, saved in zip(self.parameters(), snapshot):
            p.copy_(saved)
