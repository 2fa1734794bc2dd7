"""Smoothing groups of a decoder layer, found by structure, and folding per-channel scales into them.

A *group* is an op (a norm, or a Linear) whose output is the input of some Linears (its *consumers*). Dividing
the op's output channels by `s` and multiplying the consumers' input columns by `s` leaves the layer's float
function unchanged, and the saved model keeps its original architecture — that is what AWQ and SmoothQuant
edit. Layouts are recognised by the modules a layer has (names and shapes), never by class name; norms are
probed to learn whether they multiply by `w` (Llama) or by `1 + w` (Gemma), and during calibration each
norm is checked to really feed its consumers (`check_feeds`). Anything else is refused naming the class.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .algorithm import AlgorithmError

log = logging.getLogger("hfquant")

SUPPORTED_LAYOUTS = (
    "pre-norm (Llama, Mistral, Qwen2, Qwen3, Gemma): input_layernorm -> self_attn.{q,k,v}_proj, "
    "post_attention_layernorm -> mlp.{gate,up}_proj",
    "sandwich-norm (Gemma2, Gemma3): input_layernorm -> self_attn.{q,k,v}_proj, "
    "pre_feedforward_layernorm -> mlp.{gate,up}_proj",
)
# All self_attn may hold for v_proj -> o_proj to be exact: anything else might sit between v and o (q/k norms
# act on q and k only).
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rotary_emb"}
NORM, NORM_PLUS_ONE, LINEAR = "norm", "norm+1", "linear"


@dataclass
class SmoothGroup:
    """`source`'s output (channels = the consumers' input features) is what the consumers read."""

    source_name: str  # local name inside the layer, e.g. "input_layernorm" or "mlp.up_proj"
    source: torch.nn.Module
    kind: str  # NORM (y = w·n(x) [+ b]), NORM_PLUS_ONE (y = (1 + w)·n(x)), LINEAR (rows of a Linear)
    consumer_names: Tuple[str, ...]  # local names
    consumers: Tuple[torch.nn.Linear, ...]

    @property
    def label(self) -> str:
        return f"{self.source_name} -> {', '.join(self.consumer_names)}"


def refuse(layer: torch.nn.Module, why: str, algorithm: str, name: str = "") -> AlgorithmError:
    where = f"{name.rstrip('.')} ({type(layer).__name__})" if name else type(layer).__name__
    return AlgorithmError(
        f"{algorithm} cannot smooth {where}: {why}. Supported decoder layouts (recognised by "
        f"structure): {'; '.join(SUPPORTED_LAYOUTS)}. Use rtn or gptq for this model, or drop {algorithm}."
    )


def find_groups(layer: torch.nn.Module, algorithm: str, linear_pairs: bool = True,
                name: str = "") -> List[SmoothGroup]:
    """The layer's groups in forward order: attention input, [v -> o], MLP input, [up -> down].

    `linear_pairs` adds the Linear -> Linear groups where they are exact: v_proj -> o_proj when nothing but
    attention sits between them and their shapes agree (no grouped-query head sharing), up_proj -> down_proj
    when the MLP is linear in up_proj's output (probed). `name` (the layer's prefix) is named in refusals."""
    def fail(why: str) -> AlgorithmError:
        return refuse(layer, why, algorithm, name)

    attn = _part(layer, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), fail)
    mlp = _part(layer, "mlp", ("gate_proj", "up_proj", "down_proj"), fail)
    sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma2/3: post_attention_layernorm follows attention
    groups = [_norm_group(layer, "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), fail)]
    if linear_pairs and attn.v_proj.out_features == attn.o_proj.in_features and \
            {n for n, _ in attn.named_children()} <= _ATTENTION_PARTS:
        groups.append(_linear_group("self_attn", attn, "v_proj", "o_proj"))
    mlp_norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
    groups.append(_norm_group(layer, mlp_norm, "mlp", ("gate_proj", "up_proj"), fail))
    if linear_pairs and _linear_in_up(mlp):
        groups.append(_linear_group("mlp", mlp, "up_proj", "down_proj"))
    return groups


def _part(layer, name: str, linears: Tuple[str, ...], fail) -> torch.nn.Module:
    part = getattr(layer, name, None)
    missing = [n for n in linears if not isinstance(getattr(part, n, None), torch.nn.Linear)]
    if part is None or missing:
        raise fail("it has no Linear " + ", ".join(f"{name}.{n}" for n in (missing or linears)))
    return part


def _norm_group(layer, norm_name: str, part: str, consumers: Tuple[str, ...], fail) -> SmoothGroup:
    norm = getattr(layer, norm_name, None)
    if not isinstance(norm, torch.nn.Module):
        raise fail(f"it has no {norm_name}")
    mods = tuple(getattr(getattr(layer, part), c) for c in consumers)
    kind = norm_form(norm, norm_name, fail)
    width = {m.in_features for m in mods}
    if width != {norm.weight.numel()}:
        raise fail(f"{norm_name} has {norm.weight.numel()} channels but {part}'s projections read {sorted(width)}")
    return SmoothGroup(norm_name, norm, kind, tuple(f"{part}.{c}" for c in consumers), mods)


def _linear_group(part: str, parent, source: str, consumer: str) -> SmoothGroup:
    return SmoothGroup(f"{part}.{source}", getattr(parent, source), LINEAR, (f"{part}.{consumer}",),
                       (getattr(parent, consumer),))


def norm_form(norm: torch.nn.Module, name: str, fail) -> str:
    """NORM when `norm` computes w·n(x) [+ b], NORM_PLUS_ONE when (1 + w)·n(x): probed on a copy with set
    weights (Gemma's zero-initialised weight means "× 1"), so no list of norm classes is needed."""
    params = dict(norm.named_parameters())
    if set(params) not in ({"weight"}, {"weight", "bias"}) or params["weight"].dim() != 1:
        raise fail(f"{name} ({type(norm).__name__}) is not a norm with a per-channel weight "
                   f"(parameters: {sorted(params)})")
    probe = _without_hooks(copy.deepcopy(norm)).float()
    n = probe.weight.numel()
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0)).to(probe.weight.device)

    @torch.no_grad()
    def out(w: float) -> torch.Tensor:
        probe.weight.fill_(w)
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        return probe(x).float()

    y0, y1, y2, ym = out(0.0), out(1.0), out(2.0), out(-1.0)
    tol = 1e-4 * float(y1.abs().max().clamp(min=1e-6))
    if y0.abs().max() <= tol and (y2 - 2 * y1).abs().max() <= tol:
        return NORM
    if ym.abs().max() <= tol and (y1 - 2 * y0).abs().max() <= tol:
        return NORM_PLUS_ONE
    raise fail(f"{name} ({type(norm).__name__}) scales its output neither by w nor by 1 + w")


def _linear_in_up(mlp: torch.nn.Module) -> bool:
    """Whether the MLP's output stays the same when up_proj's outputs are divided by s and down_proj's inputs
    multiplied by s — i.e. down reads up's output channel by channel (down(act(gate(x)) * up(x)))."""
    mlp = _without_hooks(mlp)  # other algorithms' statistics hooks must not see the probe
    w = mlp.up_proj.weight
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, mlp.up_proj.in_features, generator=gen).to(w.device, w.dtype)
    s = torch.rand(mlp.up_proj.out_features, generator=gen).add_(0.5).to(w.device, w.dtype)
    handles = []
    with torch.no_grad():
        ref = mlp(x)
        handles.append(mlp.up_proj.register_forward_hook(lambda m, a, y: y / s))
        handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * s,) + tuple(a[1:])))
        try:
            got = mlp(x)
        finally:
            for h in handles:
                h.remove()
    tol = (1e-4 if w.dtype == torch.float32 else 3e-2) * float(ref.abs().max().clamp(min=1e-6))
    ok = bool((got - ref).abs().max() <= tol)
    if not ok:
        log.debug("%s: up_proj -> down_proj is not channel-wise; not smoothed", type(mlp).__name__)
    return ok


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _without_hooks(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` and its submodules (parameters shared, not copied) without forward hooks."""
    clone = copy.copy(module)
    for attr in _HOOK_DICTS:
        if hasattr(module, attr):
            setattr(clone, attr, type(getattr(module, attr))())
    clone._modules = {name: None if m is None else _without_hooks(m) for name, m in module._modules.items()}
    return clone


@torch.no_grad()
def fold(group: SmoothGroup, s: torch.Tensor, ctx=None) -> None:
    """Divide the source's output channels by `s` and multiply the consumers' input columns by `s`, in place
    (computed in float32, stored back in each tensor's dtype). A norm weight is read back after storing and the
    consumers get the scale it really achieved: a bf16 Gemma weight (1 + w)/s − 1 near −1 keeps few
    significant bits of 1 + w, and compensating in the consumers keeps the function anyway. With `ctx`, the
    consumers' inputs — now divided by that scale — are recorded there (`LayerContext.scale_inputs`)."""
    src = group.source
    s = s.float().to(src.weight.device)
    achieved = s
    if group.kind == LINEAR:
        _store(src.weight, src.weight.float() / s[:, None])
    else:
        offset = 1.0 if group.kind == NORM_PLUS_ONE else 0.0
        gain = src.weight.float() + offset  # what the norm multiplies by
        _store(src.weight, gain / s - offset)
        new_gain = src.weight.float() + offset
        achieved = torch.where(new_gain != 0, gain / new_gain, s)
    if getattr(src, "bias", None) is not None:
        _store(src.bias, src.bias.float() / achieved)
    for linear in group.consumers:
        _store(linear.weight, linear.weight.float() * achieved.to(linear.weight.device))
    if ctx is not None:  # the consumers' inputs are now divided by `achieved` (0 where a bf16 gain rounded to 0)
        factor = 1.0 / achieved if group.kind == LINEAR else torch.where(gain != 0, new_gain / gain, torch.ones_like(gain))
        ctx.scale_inputs([ctx.prefix + name for name in group.consumer_names], factor)


def _store(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


class InputStats:
    """A ctx.hook callback: per-input-channel mean and max of |x| over every calibration token, the first few
    rows (to check what feeds the input), and optionally a uniform sample of at most `max_rows` rows picked by
    seeded random keys — deterministic, and memory stays bounded whatever the calibration size."""

    def __init__(self, max_rows: int = 0, first_rows: int = 8, seed: int = 0) -> None:
        self.max_rows, self.first_rows = max_rows, first_rows
        self.sum_abs: Optional[torch.Tensor] = None
        self.max_abs: Optional[torch.Tensor] = None
        self.count = 0
        self.first: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None
        self._keys: Optional[torch.Tensor] = None
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        a = x.abs()
        part_sum, part_max = a.float().sum(0), a.amax(0).float()
        if self.sum_abs is None:
            self.sum_abs, self.max_abs = part_sum, part_max
            self.first = x[: self.first_rows].float().clone()
        else:
            self.sum_abs += part_sum
            self.max_abs = torch.maximum(self.max_abs, part_max)
        self.count += x.shape[0]
        if self.max_rows:
            self._sample(x)

    def _sample(self, x: torch.Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self._gen)
        old = 0 if self.rows is None else self.rows.shape[0]
        if old:
            keys = torch.cat([self._keys, keys])
        keep = torch.topk(keys, min(self.max_rows, keys.numel()), largest=False).indices.sort().values
        new_rows = x[(keep[keep >= old] - old).to(x.device)].float().cpu()  # indexing copies: x is not kept
        self.rows = torch.cat([self.rows[keep[keep < old]], new_rows]) if old else new_rows
        self._keys = keys[keep]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.count, 1)


class FirstRows:
    """A ctx.hook callback keeping the first rows a module sees (the input of a norm, to check its output is
    what the group's consumers read), and the norm's weight when the hooks went in."""

    def __init__(self, weight: torch.Tensor, rows: int = 8) -> None:
        self.n, self.rows, self.weight = rows, None, weight.detach().clone()

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = x.detach().reshape(-1, x.shape[-1])[: self.n].clone()


@torch.no_grad()
def check_feeds(group: SmoothGroup, source_input: Optional[FirstRows], consumer_input: InputStats,
                layer: torch.nn.Module, algorithm: str, name: str = "") -> None:
    """Refuse when the norm's output is not what its consumers read (a norm applied elsewhere, e.g. after a
    sublayer), which folding would silently break. Linear pairs are checked when found."""
    if group.kind == LINEAR or source_input is None or source_input.rows is None or consumer_input.first is None:
        return
    if not torch.equal(group.source.weight, source_input.weight):
        raise AlgorithmError(f"{algorithm}: {name}{group.source_name} was rescaled by an algorithm before it, after "
                             "the calibration pass, so its statistics no longer hold; use one smoothing algorithm "
                             "(awq or smoothquant) per run")
    expected = group.source(source_input.rows).float()
    got = consumer_input.first.to(expected.device)
    if expected.shape != got.shape:
        raise refuse(layer, f"{group.source_name}'s output ({tuple(expected.shape)}) is not the input of "
                            f"{group.consumer_names[0]} ({tuple(got.shape)})", algorithm, name)
    tol = 2e-2 * float(expected.abs().max().clamp(min=1e-6))
    if (expected - got).abs().max() > tol:
        raise refuse(layer, f"{group.consumer_names[0]} does not read {group.source_name}'s output directly "
                            f"(the norm is applied elsewhere in this layer)", algorithm, name)


def hook_groups(ctx, groups: List[SmoothGroup], max_rows: int = 0) -> Dict[str, Tuple[Optional[FirstRows], InputStats]]:
    """Install the statistics hooks for `groups` on ctx: {group source name: (norm input, consumers' input)}."""
    stats = {}
    for group in groups:
        first = None
        if group.kind != LINEAR:
            first = FirstRows(group.source.weight)
            ctx.hook(group.source, first)
        inputs = InputStats(max_rows=max_rows)
        ctx.hook(group.consumers[0], inputs)
        stats[group.source_name] = (first, inputs)
    return stats


class LayerGroups:
    """The per-layer bookkeeping both smoothing algorithms share: in `start`, the layer's groups that feed a
    quantized consumer (`wanted(group, ctx)`) with their input statistics hooked; in `walk`, those groups checked
    against what their consumers really read, then yielded last first with their inputs (a Linear that is both a
    source and a consumer — v_proj, up_proj — is then scaled as a source before it is searched as a consumer).
    Groups no calibration input reached are skipped with a warning; the statistics are dropped afterwards."""

    def __init__(self, algorithm: str, linear_pairs: bool, wanted, max_rows: int = 0) -> None:
        self.algorithm, self.linear_pairs, self.wanted, self.max_rows = algorithm, linear_pairs, wanted, max_rows
        self.groups: List[SmoothGroup] = []
        self.stats: Dict = {}

    def check(self, layer: torch.nn.Module, prefix: str) -> None:
        """Raise the refusal `start` would raise on this layer (the run calls it on layer 0 before any work)."""
        find_groups(layer, self.algorithm, self.linear_pairs, prefix)

    def start(self, ctx) -> None:
        self.groups, self.stats = [], {}
        if ctx.layer is None or not ctx.prefix:  # targets outside the decoder layers: nothing to fold into
            return
        groups = find_groups(ctx.layer, self.algorithm, self.linear_pairs, ctx.prefix)
        self.groups = [g for g in groups if self.wanted(g, ctx)]
        self.stats = hook_groups(ctx, self.groups, max_rows=self.max_rows)

    def walk(self, ctx):
        try:
            for group in self.groups:
                first, inputs = self.stats[group.source_name]
                check_feeds(group, first, inputs, ctx.layer, self.algorithm, ctx.prefix)
            for group in reversed(self.groups):
                inputs = self.stats[group.source_name][1]
                if inputs.count == 0:
                    log.warning("%s: no calibration input reached %s%s; left unscaled", self.algorithm, ctx.prefix,
                                group.consumer_names[0])
                    continue
                yield group, inputs
        finally:
            self.groups, self.stats = [], {}
