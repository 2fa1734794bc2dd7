"""`awq`: scales searched on calibration inputs, folded so the float layer is unchanged and its quantized
output error drops below round-to-nearest's."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hfquant.algorithm import AlgorithmError
from hfquant.plugins import registries
from hfquant.quant import QuantArgs
from hfquant.scheme import QuantScheme
from hfquant_builtins.algorithms.awq import ActivationAwareScaling
from hfquant_builtins.algorithms.rtn import RoundToNearest

from .test_smoothing import (ARCHS, W4, apply_codes, layer_context, outlier_inputs, relative, run_driver, simulate,
                             sublayer_output, tiny_model, two_layer_llama)


def quantized_error(model, algorithms, x, scheme=W4) -> float:
    """Mean squared error of layer 0's quantized output against the float one, after `algorithms` + codes."""
    ref = sublayer_output(model, x)
    model = copy.deepcopy(model)
    apply_codes(simulate(model, algorithms, x, scheme))
    return float((sublayer_output(model, x) - ref).pow(2).mean())


def test_registered_as_a_data_driven_weight_editor():
    cls = registries().algorithms.get("awq")
    assert cls is ActivationAwareScaling and cls.requires_data and not cls.produces_codes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float_function_unchanged(arch):
    model, x = tiny_model(arch), outlier_inputs()
    before = sublayer_output(model, x)
    awq = ActivationAwareScaling()
    simulate(model, [awq], x)
    assert relative(sublayer_output(model, x), before) < 1e-5
    assert any(alpha > 0 for alpha in awq.chosen.values())  # it did scale something


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_beats_round_to_nearest_on_outlier_channels(arch):
    model, x = tiny_model(arch), outlier_inputs()
    rtn = quantized_error(model, [RoundToNearest()], x)
    awq = quantized_error(model, [ActivationAwareScaling(), RoundToNearest()], x)
    assert awq < 0.8 * rtn


def test_under_the_layerwise_driver_logits_beat_round_to_nearest():
    base = two_layer_llama()
    calib, test = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0)).split(4)
    with torch.no_grad():
        ref = base(test).logits
    errors = {}
    for name in ("rtn", "awq"):
        model = copy.deepcopy(base)
        chain = run_driver(model, {name: {}}, W4, calib)
        with torch.no_grad():
            errors[name] = float((model(test).logits - ref).pow(2).mean())
    assert chain.names == ["awq", "rtn"] and len(chain.steps[0][1].chosen) == 6  # 3 groups × 2 layers
    assert errors["awq"] < 0.85 * errors["rtn"]


def test_coarse_to_fine_search_picks_the_full_grids_scales(monkeypatch):
    import hfquant_builtins.algorithms.awq as awq_module

    evaluated = {"full": [], "coarse_to_fine": []}
    real = awq_module.coarse_to_fine_argmin

    def counting(points, cost, coarse=5):
        best, value, count = real(points, cost, coarse)
        evaluated[search].append(count)
        return best, value, count

    monkeypatch.setattr(awq_module, "coarse_to_fine_argmin", counting)
    base = two_layer_llama()
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    chosen, weights = {}, {}
    for search in ("full", "coarse_to_fine"):
        model = copy.deepcopy(base)
        chain = run_driver(model, {"awq": {"search": search}}, W4, calib)
        chosen[search] = dict(chain.steps[0][1].chosen)
        weights[search] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert evaluated["full"] == [20] * 6 and len(evaluated["coarse_to_fine"]) == 6  # 3 groups × 2 layers
    assert all(count <= 9 for count in evaluated["coarse_to_fine"])
    assert chosen["full"] == chosen["coarse_to_fine"] and any(chosen["full"].values())
    assert all(torch.equal(weights["full"][n], weights["coarse_to_fine"][n]) for n in weights["full"])


def test_full_range_negative_scales():
    scheme = QuantScheme("t-q4_0", weights=QuantArgs(num_bits=4, strategy="group", group_size=16, full_range=True))
    model, x = tiny_model("llama"), outlier_inputs()
    rtn = quantized_error(model, [RoundToNearest()], x, scheme)
    assert quantized_error(model, [ActivationAwareScaling(), RoundToNearest()], x, scheme) < 0.8 * rtn


def test_ignored_consumer_is_still_folded_consistently():
    scheme = QuantScheme("t-no-k", weights=W4.weights, ignore=("re:.*k_proj",))
    model, x = tiny_model("llama"), outlier_inputs()
    k_before = model.model.layers[0].self_attn.k_proj.weight.clone()
    before = sublayer_output(model, x)
    ctx = simulate(model, [ActivationAwareScaling()], x, scheme)
    assert "model.layers.0.self_attn.k_proj" not in ctx.targets
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.weight, k_before)
    assert relative(sublayer_output(model, x), before) < 1e-5


def test_groups_without_quantized_consumers_are_left_alone():
    scheme = QuantScheme("t-attn-only", weights=W4.weights, ignore=("re:.*mlp\\..*",))
    model, x = tiny_model("llama"), outlier_inputs()
    mlp_params = {n: p.clone() for n, p in model.named_parameters() if "mlp" in n or "post_attention" in n}
    awq = ActivationAwareScaling()
    simulate(model, [awq], x, scheme)
    assert all(torch.equal(p, mlp_params[n]) for n, p in model.named_parameters() if n in mlp_params)
    assert list(awq.chosen) == [
        "model.layers.0.input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"]


class GatedMlp(torch.nn.Module):
    def __init__(self, h: int, inner: int = 32):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(h, inner, bias=False), torch.nn.Linear(h, inner, bias=False)
        self.down_proj = torch.nn.Linear(inner, h, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ValueOnlyAttention(torch.nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(h, h, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.v_proj(x)) + 0 * (self.q_proj(x) + self.k_proj(x))


class PostNormLayer(torch.nn.Module):
    """Llama's module names, but post_attention_layernorm normalises the attention output (OLMo2-style) and the
    MLP reads the raw residual: folding into it would change the function."""

    def __init__(self, h: int = 16):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = LlamaRMSNorm(h), LlamaRMSNorm(h)
        self.self_attn, self.mlp = ValueOnlyAttention(h), GatedMlp(h)

    def forward(self, x):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x)))
        return h + self.mlp(h)


def test_norm_that_does_not_feed_its_consumers_is_refused():
    layer = PostNormLayer()
    ctx = layer_context(layer)
    awq = ActivationAwareScaling()
    awq.start_layer(ctx)
    with torch.no_grad():
        layer(torch.randn(2, 5, 16))
    ctx.remove_hooks()
    with pytest.raises(AlgorithmError, match="PostNormLayer.*does not read post_attention_layernorm"):
        awq.finish_layer(ctx)


def test_start_layer_refuses_unknown_layer_naming_module_and_class():
    import transformers
    layer = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)).h[0]
    with pytest.raises(AlgorithmError, match=r"model\.layers\.0 \(GPT2Block\)"):
        ActivationAwareScaling().start_layer(layer_context(layer))


def test_targets_outside_layers_are_a_no_op():
    model = tiny_model("llama")
    ctx = layer_context(model.model.layers[0])
    ctx.prefix, ctx.layer = "", None
    awq = ActivationAwareScaling()
    awq.start_layer(ctx)
    awq.finish_layer(ctx)
    assert not ctx._handles and not awq.chosen


def test_clipping_lowers_round_to_nearest_error_and_leaves_query_and_key_alone():
    model, x = tiny_model("llama"), outlier_inputs()
    plain = quantized_error(model, [ActivationAwareScaling(), RoundToNearest()], x)
    clipped = quantized_error(model, [ActivationAwareScaling(clip=True), RoundToNearest()], x)
    assert clipped < plain  # on these inputs: AWQ + RTN, ranges clipped or not
    scaled, scaled_and_clipped = copy.deepcopy(model), copy.deepcopy(model)
    simulate(scaled, [ActivationAwareScaling()], x)
    simulate(scaled_and_clipped, [ActivationAwareScaling(clip=True)], x)
    before, after = scaled.model.layers[0], scaled_and_clipped.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj"):  # they meet in a softmax: AWQ never clips them
        assert torch.equal(before.get_submodule(name).weight, after.get_submodule(name).weight)
    changed = [n for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
               if not torch.equal(before.get_submodule(n).weight, after.get_submodule(n).weight)]
    assert changed  # some range of another consumer was clipped
    for name in changed:  # clipping only pulls weights in
        w0, w1 = before.get_submodule(name).weight, after.get_submodule(name).weight
        assert bool((w1.abs() <= w0.abs() + 1e-7).all())


def test_options():
    with pytest.raises(TypeError, match="alpha.*allowed: grid, max_tokens, linear_pairs, clip, search"):
        ActivationAwareScaling(alpha=0.5)
    with pytest.raises(ValueError, match="search must be one of coarse_to_fine, full, got 'fast'"):
        ActivationAwareScaling(search="fast")
    with pytest.raises(ValueError, match="grid"):
        ActivationAwareScaling(grid=0)
    assert ActivationAwareScaling(grid=5, max_tokens=64).grid == 5
