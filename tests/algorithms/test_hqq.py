"""HQQ-style data-free optimisation: the math (`hfquant.quant.hqq`) and the plugin
(`hfquant_builtins.algorithms.hqq`)."""

from __future__ import annotations

import pytest
import torch

import hfquant.quant.hqq as hqq_math
from hfquant import Observer, QuantScheme
from hfquant.algorithm import LayerContext
from hfquant.pipeline.integrity import NonFiniteError
from hfquant.plan import ModulePlan
from hfquant.quant import QuantArgs, compute_qparams, fake_quantize, min_max, quantize, reduce_by_strategy
from hfquant.quant.hqq import optimize_qparams, optimize_zero_points
from hfquant_builtins.algorithms.hqq import Hqq

ASYM64 = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=64)
ARGS = [
    ASYM64,
    QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=64),
    QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=64, full_range=True),
    QuantArgs(num_bits=4, symmetric=False, signed=False, strategy="group", group_size=64),
    QuantArgs(num_bits=4, symmetric=False, strategy="channel"),
    QuantArgs(num_bits=8, symmetric=True, strategy="channel"),
    QuantArgs(num_bits=4, symmetric=False, strategy="tensor"),
    ASYM64.replace(float_zero_point=True),
    QuantArgs(num_bits=4, symmetric=False, signed=False, strategy="channel", float_zero_point=True),
]


def args_id(args: QuantArgs) -> str:
    kind = ("sym" if args.symmetric else "asym") + ("-full" if args.full_range else "")
    kind += ("" if args.signed else "-unsigned") + ("-fz" if args.float_zero_point else "")
    return f"{args.strategy}-int{args.num_bits}-{kind}"


def bf16(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.bfloat16).float()


def heavy_tailed(rows: int = 24, columns: int = 200, seed: int = 0) -> torch.Tensor:
    """Student-t weights (3 degrees of freedom): a few large values per row, like trained LLM weights."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, columns)) * 0.02


def rtn(w, args):
    s, z = compute_qparams(*min_max(w, args), args)
    return bf16(s), z


def slice_errors(w, scale, zp, args):
    """Σ(w − ŵ)² of every slice that shares a scale."""
    return reduce_by_strategy((fake_quantize(w, scale, zp, args) - w).double() ** 2, args,
                              lambda t: t.sum(-1, keepdim=True))


# --- the math -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", ARGS, ids=args_id)
def test_never_worse_than_round_to_nearest_per_slice(args):
    for seed in range(3):
        w = heavy_tailed(seed=seed)  # 200 columns: groups of 64 leave a last group of 8
        init = rtn(w, args)
        scale, zp = optimize_qparams(w, args, init, round_scale=bf16)
        assert scale.shape == init[0].shape and zp.shape == init[1].shape
        assert scale.dtype == torch.float32 and zp.dtype == (torch.float32 if args.float_zero_point else torch.int32)
        assert torch.equal(bf16(scale), scale)  # every scale went through round_scale
        assert torch.equal(zp.half().float(), zp.float())  # float zero points as float16 stores them
        assert bool(((zp >= args.qmin) & (zp <= args.qmax)).all())
        assert torch.equal(torch.sign(scale), torch.sign(init[0]))  # full-range scales stay negative where they were
        if args.symmetric:
            assert torch.equal(zp, init[1])  # only the scale can move
        before, after = slice_errors(w, *init, args), slice_errors(w, scale, zp, args)
        assert bool((after <= before).all())


def test_clearly_better_on_average():
    for args, wanted in ((ASYM64, 0.97), (ARGS[1], 0.9), (ARGS[2], 0.96), (ARGS[4], 0.97)):
        ratios = []
        for seed in range(4):
            w = heavy_tailed(64, 256, seed)
            init = rtn(w, args)
            ratios.append(float(slice_errors(w, *optimize_qparams(w, args, init, round_scale=bf16), args).sum()
                                / slice_errors(w, *init, args).sum()))
        assert sum(ratios) / len(ratios) < wanted, (args_id(args), ratios)


def test_float_zero_points_beat_integer_ones():
    """The grid may sit anywhere: the least-squares offset is kept (as float16) instead of rounded to a code."""
    fz = ASYM64.replace(float_zero_point=True)
    totals = {}
    for args in (ASYM64, fz):
        totals[args.float_zero_point] = sum(
            float(slice_errors(w, *optimize_qparams(w, args, rtn(w, args), round_scale=bf16), args).sum())
            for w in (heavy_tailed(64, 256, seed) for seed in range(4)))
    assert totals[True] < 0.95 * totals[False]


FZ64 = ASYM64.replace(float_zero_point=True)


def mean_abs_error(w, scale, zp, args):
    return float((fake_quantize(w, scale, zp, args) - w).abs().mean())


@pytest.mark.parametrize("args", [FZ64, FZ64.replace(strategy="channel", group_size=None),
                                  FZ64.replace(strategy="tensor", group_size=None),
                                  FZ64.replace(signed=False)], ids=lambda a: f"{a.strategy}-{'s' if a.signed else 'u'}")
def test_hqq_zero_points_start_rounded_keep_the_scale_and_lower_the_mean_error(args):
    w = heavy_tailed(24, 200, seed=12)  # ragged last group of 8 columns
    scale, zp = compute_qparams(*min_max(w, args), args)
    start = torch.round(zp)
    s0, z0 = optimize_zero_points(w, args, (scale, zp), iterations=0)
    assert torch.equal(s0, scale) and torch.equal(z0, start)
    s1, z1 = optimize_zero_points(w, args, (scale, zp))
    assert torch.equal(s1, scale) and z1.shape == zp.shape and z1.dtype == torch.float32
    assert torch.equal(z1.half().float(), z1) and bool(((z1 >= args.qmin) & (z1 <= args.qmax)).all())
    before, after = mean_abs_error(w, scale, start, args), mean_abs_error(w, s1, z1, args)
    assert after < before if args.strategy != "tensor" else after <= before  # one zero for all may already be best


def test_hqq_zero_points_do_not_depend_on_row_chunks(monkeypatch):
    w = heavy_tailed(40, 200, seed=13)
    init = compute_qparams(*min_max(w, FZ64), FZ64)
    whole = optimize_zero_points(w, FZ64, init)
    monkeypatch.setattr(hqq_math, "CHUNK_ELEMENTS", 3 * 200)
    assert torch.equal(whole[1], optimize_zero_points(w, FZ64, init)[1])


def test_hqq_zero_points_refuse_integer_zero_points_and_bad_options():
    w = heavy_tailed()
    with pytest.raises(ValueError, match="float_zero_point=True"):
        optimize_zero_points(w, ASYM64, rtn(w, ASYM64))
    with pytest.raises(ValueError, match="lp_norm"):
        optimize_zero_points(w, FZ64, rtn(w, FZ64), lp_norm=1.5)


def test_ragged_last_group_is_optimised():
    """576 columns in groups of 128: five groups, the last one of 64 columns, searched like the others."""
    args = ASYM64.replace(group_size=128)
    w = heavy_tailed(32, 576, seed=3)
    init = rtn(w, args)
    scale, zp = optimize_qparams(w, args, init, round_scale=bf16)
    assert scale.shape == (32, 5) and zp.shape == (32, 5)
    assert not torch.equal(scale[:, -1], init[0][:, -1])
    tail = args.replace(strategy="channel", group_size=None)  # the last group alone, as a channel-wise slice
    tail_scale, tail_zp = optimize_qparams(w[:, 512:], tail, (init[0][:, -1:], init[1][:, -1:]), round_scale=bf16)
    assert torch.equal(tail_scale, scale[:, -1:]) and torch.equal(tail_zp, zp[:, -1:])


def test_negative_full_range_scales():
    args = ARGS[2]
    w = heavy_tailed(16, 128, seed=5)
    init = rtn(w, args)
    assert bool((init[0] < 0).any()) and bool((init[0] > 0).any())
    scale, zp = optimize_qparams(w, args, init, round_scale=bf16)
    assert torch.equal(torch.sign(scale), torch.sign(init[0])) and not bool((zp != 0).any())
    assert slice_errors(w, scale, zp, args).sum() < slice_errors(w, *init, args).sum()


def test_extremes_are_never_clipped_beyond_half_a_step():
    """Shrinking the range until the largest weights clip lowers the squared error but costs perplexity."""
    w = heavy_tailed(16, 256, seed=6)
    w[3, 10] = 1.5  # one big outlier
    init = rtn(w, ASYM64)
    scale, zp = optimize_qparams(w, ASYM64, init, round_scale=bf16)
    err = (fake_quantize(w, scale, zp, ASYM64) - w).abs()
    worst = reduce_by_strategy(err, ASYM64, lambda t: t.amax(-1, keepdim=True))
    rtn_worst = reduce_by_strategy((fake_quantize(w, *init, ASYM64) - w).abs(), ASYM64,
                                   lambda t: t.amax(-1, keepdim=True))
    assert bool((worst <= torch.maximum(scale.abs() / 2, rtn_worst) * (1 + hqq_math.SLACK)).all())


def test_degenerate_slices():
    w = heavy_tailed(6, 128, seed=7)
    w[0] = 0.0  # all zero: scale 1 from the observer
    w[1] = 0.25  # constant
    w[2, :64] = torch.linspace(0.01, 0.3, 64)  # one-signed group
    w[3, 64:] = 1e-30  # subnormal range
    for args in ARGS:
        init = rtn(w, args)
        scale, zp = optimize_qparams(w, args, init, round_scale=bf16)
        assert bool(torch.isfinite(scale).all()) and bool((scale != 0).all())
        assert bool((slice_errors(w, scale, zp, args) <= slice_errors(w, *init, args)).all())


def test_row_chunks_do_not_change_the_result(monkeypatch):
    w = heavy_tailed(40, 200, seed=8)
    init = rtn(w, ASYM64)
    whole = optimize_qparams(w, ASYM64, init, round_scale=bf16)
    monkeypatch.setattr(hqq_math, "CHUNK_ELEMENTS", 3 * 200)  # three rows at a time, last chunk one row
    chunked = optimize_qparams(w, ASYM64, init, round_scale=bf16)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_deterministic_and_no_input_changes():
    w = heavy_tailed(seed=9)
    init = rtn(w, ASYM64)
    copies = (w.clone(), init[0].clone(), init[1].clone())
    first, second = (optimize_qparams(w, ASYM64, init, round_scale=bf16) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(w, copies[0]) and torch.equal(init[0], copies[1]) and torch.equal(init[1], copies[2])


def test_zero_iterations_still_tries_the_finest_grid():
    w = heavy_tailed(seed=10)
    init = rtn(w, ASYM64)
    scale, zp = optimize_qparams(w, ASYM64, init, iterations=0, round_scale=bf16)
    assert slice_errors(w, scale, zp, ASYM64).sum() < slice_errors(w, *init, ASYM64).sum()


def test_rejects_bad_arguments():
    w = heavy_tailed()
    with pytest.raises(ValueError, match="iterations"):
        optimize_qparams(w, ASYM64, rtn(w, ASYM64), iterations=-1)
    token = QuantArgs(num_bits=8, strategy="token", dynamic=True)
    with pytest.raises(ValueError, match="token"):
        optimize_qparams(w, token, (torch.ones(24, 1), torch.zeros(24, 1, dtype=torch.int32)))


# --- the plugin -----------------------------------------------------------------------------------------------

def context(targets, args=ASYM64):
    plans = {n: ModulePlan(n, args) for n in targets}
    return LayerContext("", None, targets, plans, QuantScheme("test", weights=args),
                        make_observer=lambda a: Observer(a), round_scale=bf16)


def test_plugin_runs_hqq_zero_points_for_float_zero_schemes():
    linear = torch.nn.Linear(200, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(heavy_tailed(seed=14))
    ctx = context({"fc": linear}, FZ64)
    Hqq(zero_iterations=5).finish_layer(ctx)
    mp = ctx.plans["fc"]
    expected = optimize_zero_points(linear.weight.detach(), FZ64, rtn(linear.weight.detach(), FZ64), iterations=5)
    assert torch.equal(mp.weight_qparams[0], expected[0]) and torch.equal(mp.weight_qparams[1], expected[1])
    assert torch.equal(mp.weight_codes, quantize(linear.weight.detach(), *expected, FZ64))


@pytest.mark.parametrize("args", [ASYM64, ARGS[2]], ids=args_id)
def test_plugin_sets_consistent_codes(args):
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(heavy_tailed(seed=11))
    before = linear.weight.detach().clone()
    ctx = context({"fc": linear}, args)
    algorithm = Hqq()
    algorithm.start_layer(ctx)
    algorithm.finish_layer(ctx)
    assert torch.equal(linear.weight, before)  # the driver, not the algorithm, writes the weight back
    mp = ctx.plans["fc"]
    scale, zp = mp.weight_qparams
    assert torch.equal(bf16(scale), scale)
    assert torch.equal(mp.weight_codes, quantize(before, scale, zp, args))
    assert scale.shape == zp.shape == (24, 4) and scale.dtype == torch.float32 and zp.dtype == torch.int32
    expected = optimize_qparams(before, args, rtn(before, args), round_scale=bf16)
    assert torch.equal(scale, expected[0]) and torch.equal(zp, expected[1])


def test_plugin_leaves_codes_of_others_and_unquantized_targets():
    a, b = torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(64, 8, bias=False)
    ctx = context({"a": a, "b": b})
    done = torch.zeros(8, 64, dtype=torch.int8)
    ctx.plans["a"].weight_codes = done
    ctx.plans["b"].weight_args = None
    Hqq().finish_layer(ctx)
    assert ctx.plans["a"].weight_codes is done and ctx.plans["b"].weight_codes is None


def test_plugin_names_a_non_finite_weight():
    linear = torch.nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.0.fc.weight"):
        Hqq().finish_layer(context({"model.layers.0.fc": linear}))


def test_plugin_options():
    with pytest.raises(TypeError, match=r"\['iters'\].*allowed: beta, iterations, lp_norm, margin, norm, zero_iterations"):
        Hqq(iters=3)
    for bad in ({"iterations": -1}, {"zero_radius": 1.5}, {"margin": -0.1}, {"norm": 0}, {"iterations": True},
                {"zero_iterations": -1}, {"lp_norm": 0}, {"lp_norm": 2}, {"beta": 0}):
        with pytest.raises(ValueError):
            Hqq(**bad)
    assert Hqq.requires_data is False and Hqq.produces_codes is True


def test_registered():
    from hfquant.plugins import registries

    assert registries().algorithms.get("hqq") is Hqq


def test_streaming_driver_unit():
    """The streaming writer's unit of work (one module, nothing else loaded) uses hqq's codes, no data needed."""
    from hfquant.pipeline.layerwise import make_chain, quantize_module

    linear = torch.nn.Linear(200, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(heavy_tailed(seed=12))
    chain = make_chain({"hqq": {"iterations": 2}})
    assert not chain.requires_data
    mp = ModulePlan("fc", ASYM64)
    quantize_module(chain, mp, linear, QuantScheme("test", weights=ASYM64), lambda a: Observer(a), bf16)
    assert chain.handled == {"fc": "hqq"}
    expected = optimize_qparams(linear.weight.detach(), ASYM64, rtn(linear.weight.detach(), ASYM64), 2, bf16)
    assert torch.equal(mp.weight_qparams[0], expected[0]) and torch.equal(mp.weight_qparams[1], expected[1])
