"""`smoothquant`: activation outliers migrated into the weights — flatter inputs, same float function, smaller
w8a8 error."""

from __future__ import annotations

import copy

import pytest
import torch

from hfquant.plugins import registries
from hfquant.quant import QuantArgs, dynamic_qparams, fake_quantize
from hfquant.scheme import QuantScheme
from hfquant_builtins.algorithms.rtn import RoundToNearest
from hfquant_builtins.algorithms.smoothquant import SmoothQuant

from .test_smoothing import (ARCHS, apply_codes, outlier_inputs, relative, run_driver, simulate, sublayer_output,
                             tiny_model, two_layer_llama)

W8A8 = QuantScheme("t-w8a8", weights=QuantArgs(num_bits=8, strategy="channel"),
                   input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True))


def input_ranges(model, x, name: str) -> torch.Tensor:
    """max |input| per channel of layer 0's `name` Linear."""
    got = []
    module = model.model.layers[0].get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, args: got.append(args[0].abs().amax(dim=(0, 1))))
    with torch.no_grad():
        model.model(inputs_embeds=x)
    handle.remove()
    return got[0]


def w8a8_error(model, algorithms, x) -> float:
    """MSE of layer 0's output with int8 weights (codes) and per-token int8 inputs (fake-quantized) vs float."""
    ref = sublayer_output(model, x)
    model = copy.deepcopy(model)
    ctx = simulate(model, algorithms, x, W8A8)
    apply_codes(ctx)
    args = W8A8.input_activations
    handles = [linear.register_forward_pre_hook(lambda m, a: (fake_quantize(a[0], *dynamic_qparams(a[0], args), args),))
               for linear in ctx.targets.values()]
    try:
        return float((sublayer_output(model, x) - ref).pow(2).mean())
    finally:
        for h in handles:
            h.remove()


def test_registered_as_a_data_driven_weight_editor():
    cls = registries().algorithms.get("smoothquant")
    assert cls is SmoothQuant and cls.requires_data and not cls.produces_codes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float_function_unchanged(arch):
    model, x = tiny_model(arch, kv_heads=4), outlier_inputs()
    before = sublayer_output(model, x)
    simulate(model, [SmoothQuant(linear_pairs=True)], x, W8A8)
    assert relative(sublayer_output(model, x), before) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_flattens_activation_outliers(arch):
    model, x = tiny_model(arch), outlier_inputs()
    before = {n: input_ranges(model, x, n) for n in ("self_attn.q_proj", "mlp.gate_proj")}
    simulate(model, [SmoothQuant()], x, W8A8)
    for name, r0 in before.items():
        r1 = input_ranges(model, x, name)
        assert float(r1.max() / r1.median()) < 0.5 * float(r0.max() / r0.median()), name


def test_reduces_w8a8_error():
    model, x = tiny_model("llama"), outlier_inputs()
    rtn = w8a8_error(model, [RoundToNearest()], x)
    assert w8a8_error(model, [SmoothQuant(), RoundToNearest()], x) < 0.7 * rtn


def test_under_the_layerwise_driver():
    model = two_layer_llama()
    norms = {n: p.clone() for n, p in model.named_parameters() if "layernorm" in n}
    chain = run_driver(model, {"smoothquant": {}}, W8A8, torch.randint(0, 300, (4, 32)))
    assert chain.names == ["smoothquant", "rtn"]
    assert all(not torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)


def test_alpha_zero_moves_only_weight_range_and_ignored_consumers_follow():
    scheme = QuantScheme("t-no-k", weights=W8A8.weights, input_activations=W8A8.input_activations,
                         ignore=("re:.*k_proj",))
    model, x = tiny_model("llama"), outlier_inputs()
    k_before = model.model.layers[0].self_attn.k_proj.weight.clone()
    before = sublayer_output(model, x)
    simulate(model, [SmoothQuant(alpha=0.0)], x, scheme)
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.weight, k_before)
    assert relative(sublayer_output(model, x), before) < 1e-5


def test_two_smoothing_algorithms_in_one_run_are_refused():
    from hfquant.algorithm import AlgorithmError
    from hfquant_builtins.algorithms.awq import ActivationAwareScaling

    with pytest.raises(AlgorithmError, match="use one smoothing algorithm"):
        simulate(tiny_model("llama"), [SmoothQuant(), ActivationAwareScaling()], outlier_inputs(), W8A8)


def test_searched_alpha_beats_the_papers_fixed_alpha_and_is_recorded():
    model, x = tiny_model("llama"), outlier_inputs()
    searched = SmoothQuant()
    fixed = w8a8_error(model, [SmoothQuant(alpha=0.5), RoundToNearest()], x)
    assert w8a8_error(model, [searched, RoundToNearest()], x) <= fixed
    assert searched.chosen and all(a is None or 0.0 <= a <= 1.0 for a in searched.chosen.values())


def test_search_never_loses_to_no_smoothing_on_its_sample():
    """Unsmoothed is one of the candidates: on inputs without outliers (where the paper's α=0.5 may hurt) the
    searched result is at least as good as plain round-to-nearest on the rows it searched on."""
    model, x = tiny_model("llama"), torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    rtn = w8a8_error(model, [RoundToNearest()], x)
    assert w8a8_error(model, [SmoothQuant(linear_pairs=False), RoundToNearest()], x) <= rtn * 1.001


def test_options():
    with pytest.raises(TypeError, match="bogus.*allowed: alpha, grid, max_tokens, linear_pairs"):
        SmoothQuant(bogus=3)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=2)
    with pytest.raises(ValueError, match="alpha.*'search'"):
        SmoothQuant(alpha="auto")
    with pytest.raises(ValueError, match="grid"):
        SmoothQuant(grid=0)
    assert SmoothQuant(alpha=0.8).alpha == 0.8
    assert SmoothQuant().alpha == "search"
