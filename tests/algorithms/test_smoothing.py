"""Smoothing groups found by structure, folding that keeps the float function, and the pure scale math."""

from __future__ import annotations

import pytest
import torch
import transformers

from hfquant.algorithm import AlgorithmError, LayerContext
from hfquant.plan import ModulePlan
from hfquant.quant import QuantArgs, dequantize
from hfquant.quant.smoothing import (alpha_grid, awq_scales, coarse_to_fine_argmin, column_max_abs, error_basis,
                                     output_error, scaled_quant_delta, smoothquant_scales)
from hfquant.scheme import QuantScheme
from hfquant.smoothing import LINEAR, NORM, NORM_PLUS_ONE, InputStats, SmoothGroup, find_groups, fold
from hfquant_builtins.observers.minmax import MinMaxObserver

W4 = QuantScheme("t-w4", weights=QuantArgs(num_bits=4, strategy="group", group_size=16))
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


# ---- helpers shared by test_awq.py and test_smoothquant.py (no test_ prefix: not collected twice) ----

def tiny_model(arch: str, kv_heads: int = 2, hidden: int = 64) -> torch.nn.Module:
    """A one-layer causal LM of `arch` with random weights and random (non-trivial) norm weights."""
    cfg_name, cls_name = ARCHS[arch]
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    cfg = getattr(transformers, cfg_name)(vocab_size=32, hidden_size=hidden, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=hidden // 4,
                                          max_position_embeddings=64)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def outlier_inputs(hidden: int = 64, seed: int = 1) -> torch.Tensor:
    """(batch, seq, hidden) embeddings where a few channels are ~25× larger, as in real LLM activations."""
    x = torch.randn(4, 16, hidden, generator=torch.Generator().manual_seed(seed))
    x[..., [3, 17, 40]] *= 25
    return x


def layer_context(layer: torch.nn.Module, scheme: QuantScheme = W4, model=None) -> LayerContext:
    prefix = "model.layers.0."
    targets = {prefix + n: m for n, m in layer.named_modules() if n and scheme.is_target(prefix + n, m)}
    plans = {n: ModulePlan(n, scheme.weights, input_args=scheme.input_activations) for n in targets}
    return LayerContext(prefix, layer, targets, plans, scheme, lambda args: MinMaxObserver(args), model=model,
                        num_samples=1)


def sublayer_output(model, x: torch.Tensor) -> torch.Tensor:
    """What layer 0 adds to its input (the residual stream would hide small changes)."""
    got = {}
    handle = model.model.layers[0].register_forward_hook(
        lambda m, args, out: got.setdefault("y", (out if torch.is_tensor(out) else out[0]) - args[0]))
    try:
        with torch.no_grad():
            model.model(inputs_embeds=x)
    finally:
        handle.remove()
    return got["y"]


def simulate(model, algorithms, x: torch.Tensor, scheme: QuantScheme = W4) -> LayerContext:
    """The layerwise driver's calls for layer 0: start_layer, calibration forward, remove hooks, finish_layer."""
    ctx = layer_context(model.model.layers[0], scheme, model)
    for algorithm in algorithms:
        algorithm.start_layer(ctx)
    with torch.no_grad():
        model.model(inputs_embeds=x)
    ctx.remove_hooks()
    for algorithm in algorithms:
        algorithm.finish_layer(ctx)
    return ctx


def apply_codes(ctx: LayerContext) -> None:
    """What the driver does after finish_layer: each target's weight becomes its dequantized codes."""
    with torch.no_grad():
        for name, linear in ctx.targets.items():
            plan = ctx.plans[name]
            scale, zero_point = plan.weight_qparams
            linear.weight.copy_(dequantize(plan.weight_codes, scale, zero_point, plan.weight_args))


def two_layer_llama() -> torch.nn.Module:
    """A 2-layer Llama whose embeddings have three outlier channels (what makes activation-aware scaling pay)."""
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17, 40]] *= 20
    return model


def run_driver(model, algorithms: dict, scheme: QuantScheme, ids: torch.Tensor):
    """The real layer-by-layer driver over `model` (in place); every target's weight ends as its dequantized codes."""
    from hfquant.pipeline.calibrate import build_plan
    from hfquant.pipeline.layerwise import make_chain, quantize_in_memory

    class Windows:
        input_ids = ids

        def __len__(self):
            return ids.shape[0]

    plan = build_plan(model, scheme, "minmax", MinMaxObserver, {})
    chain = make_chain(algorithms)
    quantize_in_memory(model, plan, chain, lambda args: MinMaxObserver(args), windows=Windows())
    with torch.no_grad():
        for name, mp in plan.modules.items():
            scale, zero_point = mp.weight_qparams
            model.get_submodule(name).weight.copy_(dequantize(mp.weight_codes, scale, zero_point, mp.weight_args))
    return chain


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_scales(n: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 4 + 0.1


# ---- structure ----

@pytest.mark.parametrize("arch,mlp_norm,kind", [
    ("llama", "post_attention_layernorm", NORM), ("qwen2", "post_attention_layernorm", NORM),
    ("mistral", "post_attention_layernorm", NORM), ("gemma", "post_attention_layernorm", NORM_PLUS_ONE),
    ("gemma2", "pre_feedforward_layernorm", NORM_PLUS_ONE), ("gemma3", "pre_feedforward_layernorm", NORM_PLUS_ONE),
])
def test_groups_recognised_by_structure(arch, mlp_norm, kind):
    groups = find_groups(tiny_model(arch).model.layers[0], "awq")
    labels = [g.label for g in groups]
    assert labels == ["input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj",
                      f"{mlp_norm} -> mlp.gate_proj, mlp.up_proj", "mlp.up_proj -> mlp.down_proj"]  # GQA: no v -> o
    assert [g.kind for g in groups] == [kind, kind, LINEAR]


def test_v_to_o_only_without_head_sharing():
    groups = find_groups(tiny_model("llama", kv_heads=4).model.layers[0], "awq")
    assert "self_attn.v_proj -> self_attn.o_proj" in [g.label for g in groups]
    assert len(find_groups(tiny_model("llama", kv_heads=4).model.layers[0], "awq", linear_pairs=False)) == 2


@pytest.mark.parametrize("arch,kv_heads", [(a, 2) for a in ARCHS] + [("qwen2", 4)])  # qwen2 MHA: v_proj has a bias
def test_folding_keeps_the_float_function(arch, kv_heads):
    model = tiny_model(arch, kv_heads=kv_heads)
    x = outlier_inputs()
    before = sublayer_output(model, x)
    groups = find_groups(model.model.layers[0], "awq")
    weights = {n: p.clone() for n, p in model.named_parameters()}
    for i, group in enumerate(groups):
        fold(group, random_scales(group.consumers[0].in_features, seed=i))
    assert relative(sublayer_output(model, x), before) < 1e-5
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert "model.layers.0.input_layernorm.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
    assert not any("post_feedforward" in n for n in changed)


def test_folding_a_layernorm_with_bias():
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 5)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = linear(norm(x))
        fold(SmoothGroup("norm", norm, NORM, ("linear",), (linear,)), random_scales(8))
        assert relative(linear(norm(x)), before) < 1e-5


def test_bf16_gemma_norm_rounding_is_compensated_in_the_consumers():
    norm = tiny_model("gemma").model.layers[0].input_layernorm.to(torch.bfloat16)
    linear = torch.nn.Linear(norm.weight.numel(), 3)
    x = torch.randn(5, norm.weight.numel())
    with torch.no_grad():
        before = linear(norm(x))  # a float32 input: the norm computes in float32 with its bf16 weight
        s = torch.full((norm.weight.numel(),), 30.0)  # (1 + w)/30 − 1 ≈ −0.97: bf16 keeps ~2 bits of 1 + w'
        fold(SmoothGroup("input_layernorm", norm, NORM_PLUS_ONE, ("linear",), (linear,)), s)
        assert relative(linear(norm(x)), before) < 1e-5  # 2e-2 without the compensation


@pytest.mark.parametrize("build", [
    lambda: transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)).h[0],
    lambda: transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64)).encoder.layer[0],
])
def test_unknown_layouts_are_refused_naming_the_class(build):
    layer = build()
    with pytest.raises(AlgorithmError) as err:
        find_groups(layer, "awq")
    assert type(layer).__name__ in str(err.value) and "Supported decoder layouts" in str(err.value)


# ---- statistics ----

def test_input_stats_bounded_deterministic_sample():
    def collect():
        stats = InputStats(max_rows=10)
        for seed in range(3):
            stats(None, torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(seed)))
        return stats
    a, b = collect(), collect()
    assert a.rows.shape == (10, 4) and torch.equal(a.rows, b.rows) and a.count == 42
    xs = torch.cat([torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(s)).reshape(-1, 4) for s in range(3)])
    assert torch.allclose(a.mean_abs, xs.abs().mean(0)) and torch.equal(a.max_abs, xs.abs().amax(0))
    assert all(any(torch.equal(r, x) for x in xs) for r in a.rows)  # real rows, no copies of one


# ---- pure math ----

def test_alpha_zero_is_no_scaling_and_scales_are_centred():
    act = torch.tensor([0.1, 1.0, 10.0, 0.0])
    assert torch.equal(awq_scales(act, 0.0), torch.ones(4))
    s = awq_scales(act, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0)) and bool((s > 0).all())
    assert alpha_grid(4) == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("points", [1, 2, 5, 9, 10, 19, 20, 33, 64])
def test_coarse_to_fine_finds_the_minimum_of_one_basin_with_fewer_evaluations(points):
    gen = torch.Generator().manual_seed(points)
    for _ in range(20):  # random one-basin costs: |i - centre|^p with random centre, power and slope
        centre, power = float(torch.rand(1, generator=gen)) * points, 0.5 + 2 * float(torch.rand(1, generator=gen))
        costs = [abs(i - centre) ** power for i in range(points)]
        calls = []
        best, cost, evaluated = coarse_to_fine_argmin(points, lambda i: calls.append(i) or costs[i])
        assert best == min(range(points), key=costs.__getitem__) and cost == costs[best]
        assert evaluated == len(set(calls)) == len(calls)  # each point evaluated at most once
        assert evaluated == points if points < 10 else evaluated <= (points + 1) // 2 + 4
    assert coarse_to_fine_argmin(20, lambda i: (i - 7) ** 2)[2] == 9  # AWQ's 20-point grid: 9 evaluations


def test_coarse_to_fine_ties_go_low_and_nan_loses_to_everything():
    assert coarse_to_fine_argmin(20, lambda i: 1.0)[:2] == (0, 1.0)
    nan_at_zero = coarse_to_fine_argmin(20, lambda i: float("nan") if i == 0 else (i - 12) ** 2)
    assert nan_at_zero[:2] == (12, 0)
    assert coarse_to_fine_argmin(8, lambda i: float("nan") if i == 0 else float("inf"))[:2] == (1, float("inf"))
    best, cost, _ = coarse_to_fine_argmin(20, lambda i: float("nan"))
    assert best == 0 and cost != cost  # every candidate NaN: the caller sees NaN and refuses
    for points, coarse in ((0, 5), (5, 0)):
        with pytest.raises(ValueError, match="points and coarse must be >= 1"):
            coarse_to_fine_argmin(points, lambda i: 0.0, coarse=coarse)


def test_coarse_equal_to_points_evaluates_every_point():
    """What awq's search=full uses: two basins, the deeper one missed by the coarse steps, found when all are tried."""
    costs = [3, 1, 2, 4, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 0.0, 7, 6, 6, 6, 6]
    best, cost, evaluated = coarse_to_fine_argmin(len(costs), costs.__getitem__, coarse=len(costs))
    assert (best, cost, evaluated) == (14, 0.0, 20)
    assert coarse_to_fine_argmin(len(costs), costs.__getitem__)[:2] == (1, 1)  # the coarse steps miss index 14


def test_smoothquant_scales_balance_activation_and_weight_ranges():
    act_max, weights = torch.tensor([50.0, 1.0, 0.5]), [torch.randn(6, 3), torch.randn(2, 3)]
    s = smoothquant_scales(act_max, column_max_abs(weights), 0.5)
    assert torch.allclose(act_max / s, column_max_abs([w * s for w in weights]))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(act_max, column_max_abs(weights), 1.5)


@pytest.mark.parametrize("rows", [3, 20])  # fewer rows than inputs (X itself), more (QR's R)
def test_output_error_is_the_squared_output_difference(rows):
    w, x = torch.randn(5, 8), torch.randn(rows, 8)
    delta = scaled_quant_delta(w, random_scales(8), lambda t: t.round())
    assert error_basis(x).shape == (min(rows, 8), 8)
    assert output_error(delta, error_basis(x)) == pytest.approx(float((x @ delta.T).pow(2).sum()), rel=1e-4)
    assert float(scaled_quant_delta(w, random_scales(8), lambda t: t).abs().max()) < 1e-6
