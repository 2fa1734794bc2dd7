"""GPTQ: the math (`hfquant.quant.gptq`) and the plugin (`hfquant_builtins.algorithms.gptq`) on tiny layers."""

from __future__ import annotations

import copy

import pytest
import torch

from hfquant import Observer, QuantScheme
from hfquant.algorithm import AlgorithmError, LayerContext
from hfquant.plan import ModulePlan
from hfquant.quant import QuantArgs, code_dtype, compute_qparams, dequantize, min_max, quantize
from hfquant.quant.gptq import HessianError, gptq_quantize, prepare_hessian
from hfquant_builtins.algorithms.awq import ActivationAwareScaling
from hfquant_builtins.algorithms.gptq import Gptq

G32 = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=32)
ARGS = [
    G32,
    QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
    QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=32, full_range=True),
    QuantArgs(num_bits=8, symmetric=True, strategy="channel"),
    QuantArgs(num_bits=4, symmetric=True, strategy="tensor"),
    QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32, float_zero_point=True),
]


def args_id(args: QuantArgs) -> str:
    return (f"{args.strategy}-{'sym' if args.symmetric else 'asym'}{'-full' if args.full_range else ''}"
            f"{'-fz' if args.float_zero_point else ''}")


def minmax_qparams(x, args):
    return compute_qparams(*min_max(x, args), args)


def correlated_inputs(columns: int, tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(columns) + 0.4 * torch.randn(columns, columns, generator=g)
    return torch.randn(tokens, columns, generator=g) @ mix


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.T @ x / x.shape[0]


def weight(rows: int = 24, columns: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def run(w, h, args, act_order=True, block_size=128, dampening=0.01):
    return gptq_quantize(w, prepare_hessian(h, dampening, act_order), args, minmax_qparams, block_size)


def output_error(w, codes, scale, zp, args, x):
    return float(((dequantize(codes, scale, zp, args) - w) @ x.T).pow(2).mean())


@pytest.mark.parametrize("args", ARGS, ids=args_id)
@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_is_round_to_nearest(args, act_order):
    """With uncorrelated inputs there is nothing to compensate: GPTQ must give exactly the RTN codes."""
    w = weight()
    codes, scale, zp = run(w, torch.eye(80), args, act_order)
    rtn_scale, rtn_zp = minmax_qparams(w, args)
    assert torch.equal(codes, quantize(w, rtn_scale, rtn_zp, args))
    assert torch.equal(scale, rtn_scale) and torch.equal(zp, rtn_zp)


@pytest.mark.parametrize("args", ARGS, ids=args_id)
@pytest.mark.parametrize("act_order", [True, False])
def test_reduces_output_error_against_round_to_nearest(args, act_order):
    w, x = weight(), correlated_inputs(80)
    codes, scale, zp = run(w, hessian_of(x), args, act_order)
    assert codes.dtype == code_dtype(args)
    assert int(codes.min()) >= args.qmin and int(codes.max()) <= args.qmax
    rtn_scale, rtn_zp = minmax_qparams(w, args)
    rtn = output_error(w, quantize(w, rtn_scale, rtn_zp, args), rtn_scale, rtn_zp, args, x)
    assert output_error(w, codes, scale, zp, args, x) < 0.7 * rtn


@pytest.mark.parametrize("act_order", [True, False])
def test_ragged_last_group_keeps_plain_layout(act_order):
    """80 columns in groups of 32: three groups, the last of 16; requantizing the stored values is a fixpoint."""
    w, x = weight(), correlated_inputs(80)
    codes, scale, zp = run(w, hessian_of(x), G32, act_order)
    assert codes.shape == (24, 80) and scale.shape == (24, 3) and zp.shape == (24, 3)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert int(codes.min()) >= G32.qmin and int(codes.max()) <= G32.qmax
    assert torch.equal(quantize(dequantize(codes, scale, zp, G32), scale, zp, G32), codes)
    if act_order:  # static groups: each group's qparams are those of the original weight's group
        rtn_scale, _ = minmax_qparams(w, G32)
        assert torch.equal(scale, rtn_scale)


def test_full_range_negative_scales():
    args = ARGS[2]
    w, x = weight(), correlated_inputs(80)
    codes, scale, zp = run(w, hessian_of(x), args)
    assert bool((scale < 0).any()) and bool((scale > 0).any())
    assert int(codes.min()) == args.qmin  # the full range is used
    assert torch.equal(quantize(dequantize(codes, scale, zp, args), scale, zp, args), codes)


def test_block_size_changes_only_rounding_noise():
    """Lazy block updates (and a group start inside a block, whose pending updates are added) are exact."""
    w, h = weight(), hessian_of(correlated_inputs(80))
    for act_order in (True, False):
        a, _, _ = run(w, h, G32, act_order, block_size=128)
        b, _, _ = run(w, h, G32, act_order, block_size=7)
        assert float((a == b).float().mean()) > 0.99


def test_deterministic():
    w, h = weight(), hessian_of(correlated_inputs(80))
    first, second = run(w, h, G32), run(w, h, G32)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("act_order", [True, False])
def test_weights_sharing_a_hessian_are_quantized_together_exactly(act_order):
    """Stacking rows is exact: each weight gets the codes and qparams it gets alone."""
    from hfquant.quant.gptq import gptq_quantize_shared

    h = prepare_hessian(hessian_of(correlated_inputs(80)), act_order=act_order)
    weights = [weight(24, seed=1), weight(8, seed=2), weight(40, seed=3)]
    together = gptq_quantize_shared(weights, h, G32, [minmax_qparams] * 3)
    for w, (codes, scale, zp) in zip(weights, together):
        alone = gptq_quantize(w, h, G32, minmax_qparams)
        # BLAS blocking may differ with the row count: float noise only (in scales too, without act-order)
        assert torch.allclose(scale, alone[1], rtol=1e-5) and torch.equal(zp, alone[2])
        assert float((codes == alone[0]).float().mean()) > 0.99


def test_dead_inputs_get_zero_weights():
    x = correlated_inputs(80)
    x[:, [3, 40]] = 0.0
    w = weight()
    codes, scale, zp = run(w, hessian_of(x), G32)
    values = dequantize(codes, scale, zp, G32)
    assert torch.isfinite(values).all()
    assert torch.equal(values[:, [3, 40]], torch.zeros(24, 2))


def test_indefinite_hessian_is_retried_then_refused():
    h = torch.eye(4)
    h[0, 1] = h[1, 0] = 1000.0  # eigenvalue -999: no damping tried can fix it
    with pytest.raises(HessianError, match="retries"):
        prepare_hessian(h)
    slightly = torch.eye(4)
    slightly[0, 1] = slightly[1, 0] = 1.05  # eigenvalue -0.05: fixed by the second damping increase
    assert prepare_hessian(slightly).damping > 0.01
    with pytest.raises(HessianError, match="negative diagonal"):
        prepare_hessian(-torch.eye(4))


# --- the plugin ---------------------------------------------------------------------------------------------

def context(layer, targets, args=G32, prefix=""):
    scheme = QuantScheme("test", weights=args)
    plans = {n: ModulePlan(n, args) for n in targets}
    return LayerContext(prefix, layer, targets, plans, scheme, make_observer=lambda a: Observer(a),
                        round_scale=lambda s: s.half().float())


def run_plugin(algorithm, ctx, batches):
    algorithm.start_layer(ctx)
    for x in batches:
        ctx.layer(x)
    ctx.remove_hooks()
    algorithm.finish_layer(ctx)


def test_plugin_matches_the_math_and_rounds_scales_first():
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 24, bias=False)
    ctx = context(linear, {"fc": linear})
    batches = [correlated_inputs(80, 64, seed=s).reshape(2, 32, 80) for s in range(3)]
    before = linear.weight.detach().clone()
    run_plugin(Gptq(), ctx, batches)
    assert torch.equal(linear.weight, before)  # the driver, not the algorithm, writes the weight back
    x = torch.cat([b.reshape(-1, 80) for b in batches])
    rounded = lambda v, a: (lambda s, z: (s.half().float(), z))(*minmax_qparams(v, a))  # noqa: E731
    codes, scale, zp = gptq_quantize(before, prepare_hessian(hessian_of(x)), G32, rounded)
    mp = ctx.plans["fc"]
    assert torch.equal(mp.weight_qparams[0], scale) and torch.equal(mp.weight_qparams[1], zp)
    assert float((mp.weight_codes == codes).float().mean()) > 0.99  # running mean vs one sum: float noise only


def tiny_llama_layer(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    layer = model.model.layers[0]
    targets = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    return model, layer, targets


def calibrate(model, gptq, ctx, windows=2):
    gptq.start_layer(ctx)
    with torch.no_grad():
        for seed in range(windows):
            model(input_ids=torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(seed)))
    ctx.remove_hooks()


def test_shared_inputs_share_one_hessian():
    """q/k/v read the attention norm's output and gate/up the MLP norm's: 4 Hessians for 7 targets."""
    model, layer, targets = tiny_llama_layer()
    ctx = context(layer, targets, QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16),
                  prefix="model.layers.0.")
    gptq = Gptq()
    calibrate(model, gptq, ctx)
    groups = sorted(sorted(ctx.local_name(n) for n in s.members) for s in gptq._distinct())
    assert groups == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                      ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    assert all(s.tokens == 24 for s in gptq._distinct())
    gptq.finish_layer(ctx)
    assert ctx.plans["model.layers.0.mlp.down_proj"].weight_qparams[0].shape == (32, 3)
    assert all(mp.weight_codes is not None and mp.weight_codes.shape == targets[n].weight.shape
               for n, mp in ctx.plans.items())
    assert gptq._by_target == {}  # statistics freed


def test_an_input_shared_only_sometimes_is_refused():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x.clone())

    pair = Pair()
    ctx = context(pair, {"l.a": pair.a, "l.b": pair.b}, QuantArgs(num_bits=8, strategy="channel"))
    with pytest.raises(AlgorithmError, match="l.b shared its input with l.a"):
        run_plugin(Gptq(), ctx, [torch.randn(5, 8), torch.randn(5, 8)])


def test_plugin_skips_targets_with_codes_and_unquantized_ones():
    linear = torch.nn.Linear(80, 24, bias=False)
    ctx = context(linear, {"fc": linear})
    ctx.plans["fc"].weight_codes = done = torch.zeros(24, 80, dtype=torch.int8)
    run_plugin(Gptq(), ctx, [correlated_inputs(80, 16)])
    assert ctx.plans["fc"].weight_codes is done and ctx.plans["fc"].weight_qparams is None
    ctx.plans["fc"] = ModulePlan("fc", None)
    run_plugin(Gptq(), ctx, [correlated_inputs(80, 16)])
    assert ctx.plans["fc"].weight_codes is None


def test_target_without_inputs_is_named():
    used, unused = torch.nn.Linear(80, 24), torch.nn.Linear(80, 24)
    ctx = context(used, {"model.layers.0.used": used, "model.layers.0.unused": unused})
    with pytest.raises(AlgorithmError, match="model.layers.0.unused received no calibration inputs"):
        run_plugin(Gptq(), ctx, [correlated_inputs(80, 16)])


def test_failed_cholesky_names_the_module(monkeypatch):
    linear = torch.nn.Linear(4, 3)
    ctx = context(linear, {"model.layers.2.mlp.up_proj": linear}, QuantArgs(num_bits=8, strategy="channel"))
    gptq = Gptq()
    gptq.start_layer(ctx)
    linear(torch.randn(8, 4))
    ctx.remove_hooks()
    stats = gptq._by_target["model.layers.2.mlp.up_proj"]
    stats.h = torch.eye(4)
    stats.h[0, 1] = stats.h[1, 0] = 1000.0
    with pytest.raises(AlgorithmError, match=r"model\.layers\.2\.mlp\.up_proj.*dampening"):
        gptq.finish_layer(ctx)


def test_options_are_checked():
    with pytest.raises(TypeError, match="blocksize.*allowed: block_size, dampening, act_order"):
        Gptq(blocksize=64)
    with pytest.raises(AlgorithmError, match="dampening"):
        Gptq(dampening=0)
    gptq = Gptq(block_size=64, dampening=0.05, act_order=False)
    assert (gptq.block_size, gptq.dampening, gptq.act_order) == (64, 0.05, False)


def test_registered():
    from hfquant.plugins import registries

    assert registries().algorithms.get("gptq") is Gptq
    assert Gptq.requires_data and Gptq.produces_codes


def test_after_a_weight_editor_gptq_quantizes_the_edited_layer():
    """[awq, gptq] through the layer-by-layer driver: GPTQ gets its own calibration pass after AWQ's edits, so its
    codes are exactly those GPTQ alone gives on a copy of the model whose layer AWQ already edited."""
    from hfquant.pipeline.calibrate import build_plan
    from hfquant.pipeline.layerwise import make_chain, quantize_in_memory
    from hfquant_builtins.observers.minmax import MinMaxObserver

    model, _, _ = tiny_llama_layer()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17]] *= 20  # outlier channels: AWQ has something to scale
    scheme = QuantScheme("t-w4", weights=QuantArgs(num_bits=4, strategy="group", group_size=16))

    class Windows:
        input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return 4

    def codes(model, algorithms):
        plan = build_plan(model, scheme, "minmax", MinMaxObserver, {})
        chain = make_chain(algorithms)
        quantize_in_memory(model, plan, chain, lambda a: MinMaxObserver(a), windows=Windows())
        return chain, {n: mp.weight_codes for n, mp in plan.modules.items()}

    before = model.model.layers[0].mlp.down_proj.weight.clone()
    two_phase = copy.deepcopy(model)
    chain, chained = codes(model, {"awq": {}, "gptq": {}})  # the last layer keeps its float (edited) weights
    assert chain.names == ["awq", "gptq"] and any(a > 0 for a in chain.steps[0][1].chosen.values())
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # AWQ did edit the layer
    _, alone = codes(copy.deepcopy(model), {"gptq": {}})
    assert len(chained) == 7 and chained.keys() == alone.keys()
    # one shared pass, Hessians rescaled by AWQ's recorded input scaling = a second pass over the edited layer,
    # up to float rounding: the same codes but for a rare tie broken the other way
    for n in chained:
        assert (chained[n] != alone[n]).float().mean() < 0.002, n

    class NotRescaling(ActivationAwareScaling):  # a third-party editor that does not declare its edits
        rescales_inputs_only = False

    registry = {"awq": ActivationAwareScaling, "plain-awq": NotRescaling, "gptq": Gptq}
    plan = build_plan(two_phase, scheme, "minmax", MinMaxObserver, {})
    chain = make_chain({"plain-awq": {}, "gptq": {}}, registry=type("R", (), {"get": staticmethod(registry.get)})())
    quantize_in_memory(two_phase, plan, chain, lambda a: MinMaxObserver(a), windows=Windows())
    assert all(torch.equal(plan.modules[n].weight_codes, alone[n]) for n in alone)  # two passes: exactly GPTQ alone


def layer_inputs(model, layer, windows=2):
    """[(hidden states, keyword inputs)] of `layer` per window, as the layer-by-layer driver captures them."""
    captured = []
    handle = layer.register_forward_pre_hook(lambda _m, args, kwargs: captured.append((args[0], kwargs)),
                                             with_kwargs=True)
    with torch.no_grad():
        for seed in range(windows):
            model(input_ids=torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(seed)))
    handle.remove()
    return captured


def test_sequential_measures_each_later_input_with_the_earlier_targets_quantized():
    """`sequential`: q/k/v as usual; o_proj's Hessian is measured with q/k/v holding their dequantized codes (so
    its codes are GPTQ's on that Hessian), and the float weights are left for the driver to replace."""
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16)
    model, layer, targets = tiny_llama_layer()
    inputs = layer_inputs(model, layer)
    before = {n: t.weight.detach().clone() for n, t in targets.items()}
    plain, sequential = (context(layer, targets, args, prefix="model.layers.0.") for _ in range(2))
    for ctx, gptq in ((plain, Gptq()), (sequential, Gptq(sequential=True))):
        ctx.inputs = inputs
        calibrate(model, gptq, ctx)
        gptq.finish_layer(ctx)
    assert all(torch.equal(t.weight, before[n]) for n, t in targets.items())
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert all(torch.equal(plain.plans[n].weight_codes, sequential.plans[n].weight_codes) for n in qkv)
    # o_proj by hand: the input it reads once q/k/v hold their codes, then plain GPTQ on that Hessian
    quantized = copy.deepcopy(layer)
    for n in qkv:
        mp = sequential.plans[n]
        quantized.get_submodule(n[len("model.layers.0."):]).weight.data.copy_(
            dequantize(mp.weight_codes, *mp.weight_qparams, args))
    seen = []
    handle = quantized.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for hidden, kwargs in inputs:
            quantized(hidden, **kwargs)
    handle.remove()
    rounded = lambda v, a: (lambda s, z: (s.half().float(), z))(*minmax_qparams(v, a))  # noqa: E731
    codes, _, _ = gptq_quantize(before["model.layers.0.self_attn.o_proj"], prepare_hessian(hessian_of(torch.cat(seen))),
                                args, rounded)
    o_proj = sequential.plans["model.layers.0.self_attn.o_proj"].weight_codes
    assert float((o_proj == codes).float().mean()) > 0.99
    assert not torch.equal(o_proj, plain.plans["model.layers.0.self_attn.o_proj"].weight_codes)


def test_sequential_must_be_a_boolean():
    with pytest.raises(AlgorithmError, match="sequential must be true or false"):
        Gptq(sequential="yes")


def test_the_driver_hands_sequential_its_inputs_and_every_hook_and_weight_is_left_as_found(monkeypatch):
    """Through `quantize_layer` (the driver sets `ctx.inputs`): o_proj's codes differ from plain GPTQ's, no hook
    stays on any module, and a failure part-way restores the float weights it had replaced with codes."""
    from hfquant.pipeline.layerwise import make_chain, quantize_layer

    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16)
    model, layer, targets = tiny_llama_layer()
    inputs = layer_inputs(model, layer)
    before = {n: t.weight.detach().clone() for n, t in targets.items()}
    codes = {}
    for sequential in (False, True):
        ctx = context(layer, targets, args, prefix="model.layers.0.")
        quantize_layer(make_chain({"gptq": {"sequential": sequential}}, propagate="float"), ctx, inputs, last=True)
        codes[sequential] = ctx.plans["model.layers.0.self_attn.o_proj"].weight_codes
    assert not torch.equal(codes[False], codes[True])
    assert all(not m._forward_pre_hooks for m in layer.modules())
    assert all(torch.equal(t.weight, before[n]) for n, t in targets.items())

    calls = []
    real = Gptq._quantize

    def fail_on_the_third_batch(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(self, *a)

    monkeypatch.setattr(Gptq, "_quantize", fail_on_the_third_batch)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_layer(make_chain({"gptq": {"sequential": True}}, propagate="float"),
                       context(layer, targets, args, prefix="model.layers.0."), inputs, last=True)
    assert all(torch.equal(t.weight, before[n]) for n, t in targets.items())
    assert all(not m._forward_pre_hooks for m in layer.modules())


def test_sequential_refuses_a_layer_that_routes_its_inputs_differently_the_second_time():
    """An input the re-measuring pass does not see as often as the calibration pass did (experts a router skips once
    earlier targets are quantized) is an error naming the module, never a Hessian of zeros (= zero codes)."""
    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4), 0

        def forward(self, x):
            self.calls += 1
            h = self.a(x)
            return self.b(h) if self.calls <= 2 else h[..., :4]  # b reached in the calibration pass only

    routed = Routed()
    ctx = context(routed, {"l.a": routed.a, "l.b": routed.b}, QuantArgs(num_bits=8, strategy="channel"))
    ctx.inputs = [(torch.randn(5, 16, generator=torch.Generator().manual_seed(s)), {}) for s in range(2)]
    gptq = Gptq(sequential=True)
    gptq.start_layer(ctx)
    for hidden, kwargs in ctx.inputs:
        routed(hidden, **kwargs)
    ctx.remove_hooks()
    with pytest.raises(AlgorithmError, match=r"gptq \(sequential\): l.b read 0 tokens once the targets before them "
                                             r"were quantized, 10 in the calibration pass"):
        gptq.finish_layer(ctx)
    assert not routed.b._forward_pre_hooks
