"""`gptq`: GPTQ — codes chosen column by column, each rounding error compensated by the columns still to come,
weighted by the Hessian of the layer's calibration inputs (the math is `hfquant.quant.gptq`).

Per decoder layer, a hook on each target accumulates H = (2/N) Σ x xᵀ over every calibration token. Targets
that receive the very same input tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one
Hessian and one factorisation of its inverse, so memory stays at one layer plus one in×in float32 matrix per
distinct input. Scales come from the run's observer and go through the backend's rounding before any code is
chosen; with act-order the groups stay the plain consecutive ones, so every format can store the result.
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional

import torch

from hfquant import hookimpl
from hfquant.algorithm import AlgorithmError, LayerContext
from hfquant.quant import dequantize
from hfquant.quant.gptq import HessianError, PreparedHessian, gptq_quantize_shared, prepare_hessian
from hfquant_builtins.algorithms.rtn import observed_qparams

OPTIONS = ("block_size", "dampening", "act_order", "sequential")


class _Hessian:
    """A running mean of 2·x xᵀ over tokens for one distinct input, and the inputs already folded in (weakly
    referenced: a target that receives one of those very tensors shares this Hessian instead of adding it)."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.h: Optional[torch.Tensor] = None  # allocated with the first input, on its device
        self.tokens = 0
        self.members: List[str] = []
        self.recent: List[weakref.ref] = []
        self.prepared: Optional[PreparedHessian] = None

    def holds(self, x: torch.Tensor) -> bool:
        self.recent = [r for r in self.recent if r() is not None]
        return any(r() is x for r in self.recent)

    def take(self) -> torch.Tensor:
        """The Hessian, handed over: only the factorisation is needed from here on, and prepare_hessian can free
        each copy as soon as the next one exists (an 11008-wide Hessian is 485 MB)."""
        h, self.h = self.h, None
        return h

    def add(self, x: torch.Tensor) -> int:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        n = flat.shape[0]
        if self.h is None:
            self.h = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=x.device)
        if n:
            total = self.tokens + n
            self.h.mul_(self.tokens / total).addmm_(flat.t(), flat, alpha=2.0 / total)
            self.tokens = total
        self.recent.append(weakref.ref(x))
        return n


class _InputRead(Exception):
    """Stops a forward pass once the input a Hessian needs has been read."""


class Gptq:
    """GPTQ with lazy block updates, act-order over static groups and automatic extra damping."""

    requires_data = True
    produces_codes = True
    accepts_input_rescaling = True  # H of inputs x·f is diag(f) H diag(f): editors can share the calibration pass

    def __init__(self, block_size: int = 128, dampening: float = 0.01, act_order: bool = True, sequential: bool = False,
                 **unknown) -> None:
        if unknown:
            raise TypeError(f"gptq got unknown option(s) {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise AlgorithmError(f"gptq: block_size must be a positive integer, got {block_size!r}")
        if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or not (
                math.isfinite(dampening) and dampening > 0):
            raise AlgorithmError(f"gptq: dampening must be a positive number (typically 0.01-0.1), got {dampening!r}")
        if not isinstance(act_order, bool):
            raise AlgorithmError(f"gptq: act_order must be true or false, got {act_order!r}")
        if not isinstance(sequential, bool):
            raise AlgorithmError(f"gptq: sequential must be true or false, got {sequential!r}")
        self.block_size, self.dampening, self.act_order = block_size, float(dampening), act_order
        self.sequential = sequential  # each input's Hessian measured after the targets before it are quantized
        self._by_target: Dict[str, _Hessian] = {}
        self._seen: Dict[str, int] = {}  # tokens each target received (a shared Hessian counts them once)

    def start_layer(self, ctx: LayerContext) -> None:
        self._by_target, self._seen = {}, {}
        for name, linear in ctx.targets.items():
            if ctx.plans[name].weight_args is not None and ctx.plans[name].weight_codes is None:
                ctx.hook(linear, lambda module, x, name=name: self._observe(name, module, x))

    def _observe(self, name: str, module: torch.nn.Linear, x: torch.Tensor) -> None:
        if x.shape[-1] != module.in_features:
            raise AlgorithmError(f"gptq: {name} received inputs with {x.shape[-1]} features, expected "
                                 f"{module.in_features}; GPTQ handles Linear layers fed (..., in_features) tensors")
        stats = self._by_target.get(name)
        if stats is None:  # first call: share the Hessian of a target that received this very tensor
            stats = next((s for s in self._distinct() if s.holds(x)), None) or _Hessian(module.in_features)
            stats.members.append(name)
            self._by_target[name] = stats
        tokens = x.numel() // max(1, x.shape[-1])
        if stats.holds(x):
            self._seen[name] = self._seen.get(name, 0) + tokens
            return
        if len(stats.members) > 1 and self._seen.get(name, 0) < stats.tokens:
            others = ", ".join(m for m in stats.members if m != name)
            raise AlgorithmError(
                f"gptq: {name} shared its input with {others} on the first calibration window but received a "
                "different tensor later; GPTQ cannot tell which Hessian this input belongs to — report this model")
        self._seen[name] = self._seen.get(name, 0) + stats.add(x)

    def _distinct(self) -> List[_Hessian]:
        return list({id(s): s for s in self._by_target.values()}.values())

    @torch.no_grad()
    def finish_layer(self, ctx: LayerContext) -> None:
        try:
            self._rescale(ctx)
            batches: Dict[tuple, List[str]] = {}  # (Hessian, args) → the targets quantized together
            for name in ctx.targets:
                mp = ctx.plans[name]
                if mp.weight_args is None or mp.weight_codes is not None:
                    continue
                stats = self._by_target.get(name)
                if stats is None or stats.tokens == 0:
                    raise AlgorithmError(
                        f"gptq: {name} received no calibration inputs (the layer's forward pass never reached it); "
                        "check that the calibration data runs through this module, or exclude it from the scheme")
                batches.setdefault((id(stats), mp.weight_args), []).append(name)
            if self.sequential and ctx.inputs and ctx.layer is not None:
                self._quantize_sequentially(batches, ctx)
                return
            for names in batches.values():
                stats = self._by_target[names[0]]
                results = self._quantize(names, ctx, self._prepared(stats))
                for name, (codes, scale, zero_point) in zip(names, results):
                    ctx.plans[name].weight_qparams, ctx.plans[name].weight_codes = (scale, zero_point), codes
                    stats.members.remove(name)
                if not stats.members:
                    stats.prepared = None  # free as soon as the last sharer is done
        finally:
            self._by_target, self._seen = {}, {}

    def _quantize_sequentially(self, batches: Dict[tuple, List[str]], ctx: LayerContext) -> None:
        """True-sequential GPTQ: the targets of the first input the layer reads (q/k/v) as usual; each later input's
        Hessian is measured again with every target before it holding its dequantized codes (o_proj sees quantized
        attention, down_proj quantized gate/up), as the original GPTQ code's `--true-sequential`. One extra pass over
        the calibration windows per later input (three for a dense decoder layer), stopped once that input is read.
        Float weights are restored afterwards: the driver decides what the next layer sees."""
        reached = {name: i for i, name in enumerate(self._by_target)}  # filled as the calibration pass reached them
        stages: Dict[int, List[List[str]]] = {}  # one calibration-pass input → its batches, in forward order
        for names in sorted(batches.values(), key=lambda ns: min(reached[n] for n in ns)):
            stages.setdefault(id(self._by_target[names[0]]), []).append(names)
        for later in list(stages.values())[1:]:
            self._by_target[later[0][0]].h = None  # re-measured below; the calibration pass's copy is not needed
        saved: Dict[str, torch.Tensor] = {}
        try:
            for index, stage in enumerate(stages.values()):
                stats = self._by_target[stage[0][0]]
                if index:
                    stats = self._measure_again(stage, ctx)
                for names in stage:
                    results = self._quantize(names, ctx, self._prepared(stats))
                    for name, (codes, scale, zero_point) in zip(names, results):
                        ctx.plans[name].weight_qparams, ctx.plans[name].weight_codes = (scale, zero_point), codes
                stats.prepared = None
                if index < len(stages) - 1:  # the next input must see these targets' codes
                    for name in (n for names in stage for n in names):
                        saved[name] = ctx.targets[name].weight.detach().clone()
                        self._write_codes(name, ctx)
        finally:
            for name, weight in saved.items():
                ctx.targets[name].weight.data.copy_(weight)

    @staticmethod
    def _write_codes(name: str, ctx: LayerContext) -> None:
        plan, weight = ctx.plans[name], ctx.targets[name].weight
        weight.data.copy_(dequantize(plan.weight_codes, *plan.weight_qparams, plan.weight_args, dtype=weight.dtype))

    def _measure_again(self, stage: List[List[str]], ctx: LayerContext) -> _Hessian:
        """The Hessian of the stage's shared input over every calibration window, each forward stopped once the input
        is read; it must see as many tokens as the calibration pass did (else routing changed, e.g. experts)."""
        names = [n for batch in stage for n in batch]
        first = ctx.targets[names[0]]
        stats = _Hessian(first.in_features)
        stats.members = names

        def read(_module, args):
            stats.add(args[0])
            raise _InputRead

        handle = first.register_forward_pre_hook(read)
        try:
            for hidden, kwargs in ctx.inputs:
                try:
                    ctx.layer(hidden, **kwargs)
                except _InputRead:
                    pass
        finally:
            handle.remove()
        expected = self._seen.get(names[0], 0)
        if stats.tokens == 0 or stats.tokens != expected:
            raise AlgorithmError(
                f"gptq (sequential): {', '.join(names)} read {stats.tokens} tokens once the targets before them were "
                f"quantized, {expected} in the calibration pass — this layer routes its inputs differently then (e.g. a "
                "mixture of experts); use algorithm.gptq.sequential=false for this model")
        return stats

    def _rescale(self, ctx: LayerContext) -> None:
        """Apply the input scaling weight editors recorded after the shared calibration pass: inputs x·f give
        the Hessian diag(f) H diag(f) — the one a second pass over the edited layer would measure."""
        for stats in self._distinct():
            factors = [ctx.input_scaling.get(name) for name in stats.members]
            if all(f is None for f in factors):
                continue
            first = factors[0]
            if any(f is None or not torch.equal(f, first) for f in factors):
                raise AlgorithmError(
                    f"gptq: {', '.join(stats.members)} read the same input but a weight editor rescaled them "
                    "differently; this editor must not declare rescales_inputs_only")
            f = first.to(stats.h.device)
            stats.h.mul_(f[:, None]).mul_(f[None, :])

    def _prepared(self, stats: _Hessian) -> PreparedHessian:
        if stats.prepared is None:
            try:
                stats.prepared = prepare_hessian(stats.take(), self.dampening, self.act_order)
            except HessianError as exc:
                raise AlgorithmError(
                    f"gptq: cannot invert the Hessian of {', '.join(stats.members)} ({exc}); raise the gptq option "
                    f"`dampening` (now {self.dampening}) or use more calibration samples") from None
        return stats.prepared

    def _quantize(self, names: List[str], ctx: LayerContext, prepared: PreparedHessian):
        """GPTQ of targets that share a Hessian and quantization args, each with its own observed qparams."""
        def qparams_for(name: str):
            return lambda values, slice_args: observed_qparams(name, values, slice_args, ctx)

        weights = [ctx.targets[n].weight.detach() for n in names]
        args = ctx.plans[names[0]].weight_args
        return gptq_quantize_shared(weights, prepared, args, [qparams_for(n) for n in names], self.block_size)


@hookimpl
def register_algorithms(register):
    register("gptq", Gptq)
