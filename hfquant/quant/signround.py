"""SignRound's math: weights fake-quantized with a learnable rounding offset and range shrink, differentiably.

Round-to-nearest picks each code from the weight alone. SignRound (Cheng et al., 2023, the method behind Intel's
AutoRound) instead learns, per weight, an offset v ∈ [-½, ½] added before rounding (so a code may round the other
way) and, per scale, a factor a ∈ [a_min, 1] that shrinks the range — both by signed gradient descent on how far a
decoder layer's output moves from the float layer's. Rounding and clamping pass gradients straight through
(the straight-through estimator), so the offsets see the output error of every code they could flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .args import QuantArgs
from .primitives import code_dtype, expand_qparam


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


@dataclass
class RoundingState:
    """One weight's learnable rounding: `offset` per weight, `shrink` per scale (the observer's qparams fixed)."""

    weight: torch.Tensor  # float32, (out, in); not trained
    scale: torch.Tensor  # the observer's scale (per tensor / row / group)
    zero_point: torch.Tensor
    args: QuantArgs
    offset: torch.Tensor  # v, same shape as weight, in [-0.5, 0.5]
    shrink: torch.Tensor  # a, same shape as scale, in [min_shrink, 1]
    round_scale: Callable[[torch.Tensor], torch.Tensor] = lambda s: s  # how the backend stores scales

    @classmethod
    def start(cls, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs,
              round_scale: Callable[[torch.Tensor], torch.Tensor] = lambda s: s) -> "RoundingState":
        """v = 0 and a = 1: exactly round-to-nearest with the observer's qparams (`scale` already rounded)."""
        w = weight.detach().to(torch.float32)
        s = torch.as_tensor(scale).detach().to(torch.float32)
        return cls(w, s, torch.as_tensor(zero_point).detach().to(torch.float32), args,
                   torch.zeros_like(w, requires_grad=True), torch.ones_like(s, requires_grad=True), round_scale)

    def stored_scale(self) -> torch.Tensor:
        """The scale as it will be saved: a·s₀ through the backend's rounding."""
        with torch.no_grad():
            return self.round_scale(self.scale * self.shrink.detach()).to(torch.float32)

    def parameters(self):
        return (self.offset, self.shrink)

    def _grid(self, scale: torch.Tensor):
        s = expand_qparam(scale, self.weight, self.args)
        z = expand_qparam(self.zero_point, self.weight, self.args)
        return s, z

    def fake_quantized(self) -> torch.Tensor:
        """ŵ = s·(clamp(round(w/s + v) + z) − z), s = a·s₀ as stored (the backend's rounding, straight through) — the
        very weight `codes` and `stored_scale` dequantize to; differentiable in v and a."""
        scale = self.scale * self.shrink
        s, z = self._grid(scale + (self.stored_scale() - scale).detach())
        y = self.weight / s + self.offset
        if self.args.float_zero_point:
            q = torch.clamp(_round_ste(y + z), self.args.qmin, self.args.qmax)
        else:
            q = torch.clamp(_round_ste(y) + z, self.args.qmin, self.args.qmax)
        return (q - z) * s

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The integer codes at `stored_scale()`, with the learnt offsets."""
        s, z = self._grid(self.stored_scale())
        y = self.weight / s + self.offset
        q = torch.round(y + z) if self.args.float_zero_point else torch.round(y) + z
        return q.clamp_(self.args.qmin, self.args.qmax).to(code_dtype(self.args))

    @torch.no_grad()
    def signed_step(self, lr: float, min_shrink: float) -> None:
        """v ← v − lr·sign(∂L/∂v), a likewise, each clamped to its range; gradients cleared."""
        for p, low, high in ((self.offset, -0.5, 0.5), (self.shrink, min_shrink, 1.0)):
            if p.grad is not None:
                p.sub_(p.grad.sign(), alpha=lr).clamp_(low, high)
                p.grad = None

    def snapshot(self):
        return self.offset.detach().clone(), self.shrink.detach().clone()

    @torch.no_grad()
    def restore(self, snapshot) -> None:
        self.offset.copy_(snapshot[0])
        self.shrink.copy_(snapshot[1])
