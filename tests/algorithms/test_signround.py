"""SignRound: the differentiable rounding (`hfquant.quant.signround`) and the plugin on a tiny Llama layer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import Cache

from hfquant.algorithm import AlgorithmError
from hfquant.quant import QuantArgs, dequantize, quantize
from hfquant.quant.signround import RoundingState
from hfquant_builtins.algorithms.signround import SignRound

from .test_gptq import ARGS, args_id, context, minmax_qparams, tiny_llama_layer, weight


def first(output):
    return output[0] if isinstance(output, tuple) else output


def ragged(args: QuantArgs) -> torch.Tensor:
    return weight(rows=12, columns=80 if args.strategy != "group" else 72)  # 72 = two groups of 32 and one of 8


@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["", "learn-zero"])
@pytest.mark.parametrize("args", ARGS, ids=args_id)
def test_the_start_is_round_to_nearest(args, learn_zero_point):
    """No offset and no shrink: the fake-quantized weight and the codes are exactly round-to-nearest's."""
    w = ragged(args)
    scale, zero_point = minmax_qparams(w, args)
    state = RoundingState.start(w, scale, zero_point, args, learn_zero_point=learn_zero_point)
    assert (state.shrink_low is not None) == (learn_zero_point and not args.symmetric)  # symmetric: zero fixed
    codes = quantize(w, scale, zero_point, args)
    assert torch.equal(state.codes(), codes) and torch.equal(state.stored_scale(), scale)
    assert torch.equal(state.stored_zero_point(), zero_point.float())
    assert torch.allclose(state.fake_quantized(), dequantize(codes, scale, zero_point, args), atol=1e-6)


@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["", "learn-zero"])
@pytest.mark.parametrize("args", ARGS, ids=args_id)
def test_gradients_reach_every_offset_and_scale_straight_through(args, learn_zero_point):
    w = ragged(args)
    state = RoundingState.start(w, *minmax_qparams(w, args), args, learn_zero_point=learn_zero_point)
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (state.fake_quantized() * target).sum().backward()
    assert state.offset.grad is not None and state.offset.grad.abs().sum() > 0
    assert state.shrink.grad is not None and state.shrink.grad.shape == state.scale.shape
    if state.shrink_low is not None:  # the lower end learns through the (stored, straight-through) zero point
        assert state.shrink_low.grad.shape == state.scale.shape and state.shrink_low.grad.abs().sum() > 0
    state.signed_step(0.3, min_shrink=0.8)
    assert state.offset.grad is None and float(state.offset.detach().abs().max()) == pytest.approx(0.3)
    assert float(state.shrink.detach().min()) >= 0.8 and float(state.shrink.detach().max()) <= 1.0
    for _ in range(5):  # the offsets never leave [-1/2, 1/2]: a code moves at most one step from round-to-nearest
        (state.fake_quantized() * target).sum().backward()
        state.signed_step(0.3, min_shrink=0.8)
    assert float(state.offset.detach().abs().max()) <= 0.5 and float(state.shrink.detach().min()) >= 0.8


def layer_inputs(model, layer, windows=2):
    """The layer's calibration inputs exactly as the driver captures them (no KV cache)."""
    from hfquant.pipeline.layerwise import capture_first_layer_inputs

    class Windows(list):
        input_ids = torch.randint(0, 64, (windows, 12), generator=torch.Generator().manual_seed(0))

    return capture_first_layer_inputs(model, layer, Windows([None] * windows))


def coarse(scale: torch.Tensor) -> torch.Tensor:
    """A backend that keeps 3 mantissa bits of each scale (GGUF Q4_1 keeps 7, bf16 8): rounding that matters."""
    mantissa, exponent = torch.frexp(scale)
    return torch.ldexp(torch.round(mantissa * 16) / 16, exponent)


@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["", "learn-zero"])
@pytest.mark.parametrize("args", ARGS, ids=args_id)
def test_the_saved_codes_and_scales_are_the_weight_that_was_trained(args, learn_zero_point):
    """Whatever the offsets and shrinks, the codes at the stored (backend-rounded) scale and stored zero point
    dequantize to exactly the fake-quantized weight the loss saw — both are rounded inside the forward, straight
    through."""
    w = ragged(args)
    scale, zero_point = minmax_qparams(w, args)
    state = RoundingState.start(w, coarse(scale), zero_point, args, round_scale=coarse, learn_zero_point=learn_zero_point)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        state.offset.copy_(torch.rand(w.shape, generator=g) - 0.5)
        state.shrink.copy_(0.5 + 0.5 * torch.rand(state.shrink.shape, generator=g))
        if state.shrink_low is not None:
            state.shrink_low.copy_(0.5 + 0.5 * torch.rand(state.shrink.shape, generator=g))
    stored = state.stored_scale()
    assert torch.equal(stored, coarse(stored))
    zero = state.stored_zero_point()
    if state.shrink_low is None:
        assert not torch.equal(stored, state.scale * state.shrink.detach()) and torch.equal(zero, zero_point.float())
    else:  # the zero point moved, and is stored as the format stores it
        assert not torch.equal(zero, zero_point.float())
        assert torch.equal(zero, zero.half().float() if args.float_zero_point else zero.round())
    trained = state.fake_quantized()
    torch.testing.assert_close(dequantize(state.codes(), stored, zero, args), trained.detach(), rtol=0, atol=1e-6)
    trained.sum().backward()
    assert state.shrink.grad.abs().sum() > 0  # still learns through the rounding


@pytest.mark.parametrize("float_zero", [False, True])
def test_learning_the_zero_point_shrinks_each_end_of_the_range_on_its_own(float_zero):
    """shrink_low = ½, shrink = 1: each group's lowest representable value halves, its highest stays (AutoRound's
    min / max scales), up to how the zero point is stored."""
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32, float_zero_point=float_zero)
    w = ragged(args)
    scale, zero_point = minmax_qparams(w, args)
    state = RoundingState.start(w, scale, zero_point, args, learn_zero_point=True)
    with torch.no_grad():
        state.shrink_low.fill_(0.5)
    s, z = state.stored_scale(), state.stored_zero_point()
    assert bool((z >= args.qmin).all()) and bool((z <= args.qmax).all())
    lo, hi = (args.qmin - zero_point.float()) * scale, (args.qmax - zero_point.float()) * scale
    step = s * (0.01 if float_zero else 0.5) + 1e-6  # per group: float16 storage, or an integer zero point's rounding
    assert bool((((args.qmax - z) * s - hi).abs() <= step).all())
    assert bool((((args.qmin - z) * s - 0.5 * lo).abs() <= step).all())


def test_an_fp16_layer_still_moves_its_offsets():
    """Many small output differences (4 windows × 2048 tokens × 1024 outputs): a mean's gradient 2·diff/N underflows
    in an fp16 backward and leaves every offset at zero — round-to-nearest without a word."""
    from hfquant import Observer
    from hfquant.algorithm import LayerContext
    from hfquant.plan import ModulePlan
    from hfquant.scheme import QuantScheme

    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=32, full_range=True)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 1024, bias=False))
    with torch.no_grad():
        layer[0].weight.mul_(0.1)
    layer.to(torch.float16)
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(64) + 0.4 * torch.randn(64, 64, generator=g)  # correlated inputs: rounding errors interact
    inputs = [((torch.randn(1, 2048, 64, generator=g) @ mix).half(), {}) for _ in range(4)]
    ctx = LayerContext("", layer, {"0": layer[0]}, {"0": ModulePlan("0", args)}, QuantScheme("t", weights=args),
                       make_observer=lambda a: Observer(a))
    ctx.inputs = inputs
    algorithm = SignRound(iters=30, batch_size=2, targets="float_layer")  # no driver here to carry the float model
    algorithm.finish_layer(ctx)
    scale, zero_point = minmax_qparams(layer[0].weight.float(), args)
    rtn = quantize(layer[0].weight.float(), scale, zero_point, args)
    assert float((ctx.plans["0"].weight_codes != rtn).float().mean()) > 0.01
    first, best = algorithm.losses[""]
    assert best < first


def run_layer(algorithm, args, inputs=None, prefix="model.layers.0.", dtype=torch.float32, device="cpu"):
    """Quantize the tiny layer through the driver's `quantize_layer`; (context, the layer's output error, inputs)."""
    from hfquant.pipeline.layerwise import AlgorithmChain, quantize_layer

    model, layer, targets = tiny_llama_layer()
    model.to(device=device, dtype=dtype)
    inputs = inputs or layer_inputs(model, layer, windows=6)
    ctx = context(layer, targets, args, prefix=prefix)
    before = {n: t.weight.detach().clone() for n, t in targets.items()}
    plain_inputs = [(h, {k: None if isinstance(v, Cache) else v for k, v in kw.items()}) for h, kw in inputs]
    with torch.no_grad():
        reference = [first(layer(h, **kw)) for h, kw in plain_inputs]
    quantize_layer(AlgorithmChain([("x", algorithm)], propagate="float"), ctx, inputs, last=True)
    assert all(torch.equal(t.weight, before[n]) for n, t in targets.items())  # the driver writes codes back, not us
    assert not any(p.grad is not None for p in model.parameters())  # gradients only into its own parameters
    quantized = copy.deepcopy(layer)
    with torch.no_grad():
        for n, mp in ctx.plans.items():
            quantized.get_submodule(ctx.local_name(n)).weight.copy_(
                dequantize(mp.weight_codes, *mp.weight_qparams, args, dtype=dtype))
        error = 0.0
        for (h, kw), ref in zip(plain_inputs, reference):
            error += float((first(quantized(h, **kw)).float() - ref.float()).pow(2).mean())
    return ctx, error, inputs


@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True),
    QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16, float_zero_point=True),
    QuantArgs(num_bits=3, symmetric=False, strategy="group", group_size=16),
], ids=args_id)
@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["", "learn-zero"])
def test_learnt_rounding_lowers_the_layer_output_error_against_round_to_nearest(args, learn_zero_point):
    from hfquant_builtins.algorithms.rtn import RoundToNearest

    rtn_ctx, rtn_error, inputs = run_layer(RoundToNearest(), args)
    ctx, error, _ = run_layer(SignRound(iters=60, batch_size=2, learn_zero_point=learn_zero_point), args, inputs)
    assert error < 0.8 * rtn_error
    for name, mp in ctx.plans.items():
        codes, (scale, zero_point) = mp.weight_codes, mp.weight_qparams
        assert codes.dtype == rtn_ctx.plans[name].weight_codes.dtype and codes.shape == (
            rtn_ctx.plans[name].weight_codes.shape)
        assert int(codes.min()) >= args.qmin and int(codes.max()) <= args.qmax
        assert torch.equal(scale, scale.half().float())  # stored as the backend rounds it, before the codes
        observed, observed_zero = rtn_ctx.plans[name].weight_qparams
        assert zero_point.dtype == observed_zero.dtype
        if learn_zero_point and not args.symmetric:  # the range's ends move on their own (neither grows)
            assert bool((scale.abs() <= observed.abs() * 1.001).all())
            if args.float_zero_point:  # an integer zero point moves only once an end has moved half a step
                assert not torch.equal(zero_point, observed_zero)
        else:
            assert bool((scale.abs() <= observed.abs()).all()) and bool((scale.abs() >= 0.5 * observed.abs() - 1e-3).all())
            assert torch.equal(zero_point, observed_zero)
        # each code at most one step from round-to-nearest at the stored scale
        assert int((codes.int() - quantize(ctx.targets[name].weight, scale, zero_point, args).int()).abs().max()) <= 1


def test_a_bfloat16_layer_learns_in_its_own_dtype():
    from hfquant_builtins.algorithms.rtn import RoundToNearest

    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True)
    _, rtn_error, inputs = run_layer(RoundToNearest(), args, dtype=torch.bfloat16)
    ctx, error, _ = run_layer(SignRound(iters=40, batch_size=2), args, inputs, dtype=torch.bfloat16)
    assert error < 0.9 * rtn_error
    assert all(mp.weight_qparams[0].dtype == torch.float32 for mp in ctx.plans.values())


def test_deterministic_and_seeded():
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True)
    first, _, inputs = run_layer(SignRound(iters=20, batch_size=1), args)
    again, _, _ = run_layer(SignRound(iters=20, batch_size=1), args, inputs)
    other, _, _ = run_layer(SignRound(iters=20, batch_size=1, seed=1), args, inputs)  # other windows per step
    assert all(torch.equal(mp.weight_codes, again.plans[n].weight_codes) for n, mp in first.plans.items())
    assert any(not torch.equal(mp.weight_codes, other.plans[n].weight_codes) for n, mp in first.plans.items())


def test_a_kv_cache_among_the_inputs_is_never_grown_and_unequal_windows_run_one_by_one():
    """Inputs captured from a model run with its cache on (a third-party driver): the cache is not passed to the
    layer, so every step sees the same inputs; windows of different lengths cannot share a batch."""
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True)
    model, layer, _ = tiny_llama_layer()
    captured = []
    handle = layer.register_forward_pre_hook(lambda _m, a, kw: captured.append((a[0] if a else kw["hidden_states"], {
        k: v for k, v in kw.items() if k != "hidden_states"})), with_kwargs=True)
    with torch.no_grad():
        for length in (12, 12, 9):
            model(input_ids=torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length)),
                  use_cache=True)
    handle.remove()
    caches = [v for _, kw in captured for v in kw.values() if isinstance(v, Cache)]
    lengths = [c.get_seq_length() for c in caches]
    assert caches
    codes = []
    for inputs in (captured, [(h, {k: None if isinstance(v, Cache) else v for k, v in kw.items()}) for h, kw in captured]):
        ctx = context(layer, {f"model.layers.0.{n}": m for n, m in layer.named_modules()
                              if isinstance(m, torch.nn.Linear)}, args, prefix="model.layers.0.")
        ctx.inputs = inputs
        SignRound(iters=6, batch_size=3, targets="float_layer").finish_layer(ctx)
        codes.append({n: mp.weight_codes for n, mp in ctx.plans.items()})
        assert [c.get_seq_length() for c in caches] == lengths
    assert all(torch.equal(c, codes[1][n]) for n, c in codes[0].items())


def test_one_batch_gives_the_codes_of_one_window_at_a_time(monkeypatch):
    """Windows stacked into one forward (same length, same positions) learn what the window-by-window loop learns."""
    import hfquant_builtins.algorithms.signround as module

    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16, float_zero_point=True)
    stacked, stacked_error, inputs = run_layer(SignRound(iters=10, batch_size=3), args)
    monkeypatch.setattr(module, "_same", lambda a, b: False)
    single, single_error, _ = run_layer(SignRound(iters=10, batch_size=3), args, inputs)
    agree = [float((mp.weight_codes == single.plans[n].weight_codes).float().mean()) for n, mp in stacked.plans.items()]
    assert min(agree) > 0.99 and stacked_error == pytest.approx(single_error, rel=0.05)


def test_losses_are_recorded_per_layer():
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True)
    algorithm = SignRound(iters=10, batch_size=2)
    run_layer(algorithm, args)
    first, best = algorithm.losses["model.layers.0."]
    assert 0 < best < first


def test_after_awq_one_shared_pass_and_the_codes_fit_the_edited_layer():
    """[awq, signround] share one calibration pass; signround learns on the layer as AWQ left it, so its codes beat
    round-to-nearest of those edited weights on that layer's output."""
    from hfquant.pipeline.layerwise import _phases, make_chain, quantize_layer

    chain = make_chain({"awq": {}, "signround": {"iters": 40, "batch_size": 2}})
    assert chain.names == ["awq", "signround"] and len(_phases(chain.steps)) == 1
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True)
    model, layer, targets = tiny_llama_layer()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17]] *= 20  # outlier channels: AWQ has something to scale
    inputs = layer_inputs(model, layer, windows=4)
    before = {n: t.weight.detach().clone() for n, t in targets.items()}
    ctx = context(layer, targets, args, prefix="model.layers.0.")
    quantize_layer(chain, ctx, inputs, last=True)
    assert any(not torch.equal(t.weight, before[n]) for n, t in targets.items())  # AWQ edited the layer
    assert set(chain.handled.values()) == {"signround"}

    def output_error(codes_of):
        quantized = copy.deepcopy(layer)
        with torch.no_grad():
            for n, t in targets.items():
                quantized.get_submodule(ctx.local_name(n)).weight.copy_(codes_of(n, t))
            return sum(float((first(quantized(h, **kw)) - first(layer(h, **kw))).pow(2).mean()) for h, kw in inputs)

    learnt = output_error(lambda n, t: dequantize(ctx.plans[n].weight_codes, *ctx.plans[n].weight_qparams, args))
    def round_to_nearest(_name, linear):
        scale, zero_point = minmax_qparams(linear.weight, args)
        scale = scale.half().float()  # the test context's scale rounding
        return dequantize(quantize(linear.weight, scale, zero_point, args), scale, zero_point, args)

    rtn = output_error(round_to_nearest)
    assert learnt < 0.9 * rtn


def test_targets_without_calibration_inputs_are_refused_by_name():
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16)
    linear = torch.nn.Linear(32, 8, bias=False)
    ctx = context(None, {"lm_head": linear}, args)
    with pytest.raises(AlgorithmError, match="signround: lm_head have no calibration inputs"):
        SignRound().finish_layer(ctx)


def test_float_model_targets_without_a_driver_that_sets_them_are_refused():
    model, layer, targets = tiny_llama_layer()
    ctx = context(layer, targets, QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16),
                  prefix="model.layers.0.")
    ctx.inputs = layer_inputs(model, layer)
    algorithm = SignRound(iters=2)  # targets=float_model, the default
    assert algorithm.wants_float_outputs and not SignRound(targets="float_layer").wants_float_outputs
    with pytest.raises(AlgorithmError, match="targets=float_model needs a driver that sets ctx.float_outputs"):
        algorithm.finish_layer(ctx)


@pytest.mark.parametrize("options, message", [
    ({"iters": 0}, "iters must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"lr": -1}, "lr must be a positive number"),
    ({"min_shrink": 0}, r"min_shrink must be in \(0, 1\]"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"targets": "float"}, "targets must be one of float_model, float_layer"),
    ({"learn_zero_point": "yes"}, "learn_zero_point must be true or false"),
])
def test_options_are_checked(options, message):
    with pytest.raises(AlgorithmError, match=message):
        SignRound(**options)
    with pytest.raises(TypeError, match="unknown option"):
        SignRound(steps=3)


def test_registered_and_needs_data():
    from hfquant.plugins import registries

    assert registries().algorithms.get("signround") is SignRound
    assert SignRound.requires_data and SignRound.produces_codes
    assert SignRound().iters == 50 and SignRound().lr == pytest.approx(0.02) and SignRound(iters=200).lr == 0.005
