"""`hfquant.compile_decoding`: transformers' static cache with compiled decode steps, on the CPU too — the same
greedy tokens as eager decoding, one compilation reused across calls, and clear refusals."""

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.decoding import CompiledDecodingError, _compile_config_for
from hfquant.formats import QuantLinear
from hfquant.formats.kernels import Int4WeightLinear, kernel_module_for
from hfquant.quant import QuantArgs, compute_qparams, min_max

W4_G32 = QuantArgs(num_bits=4, strategy="group", group_size=32)


def on_cpu_kernels(model, w_args=W4_G32, a_args=None):
    """Every decoder Linear replaced by the `cpu` backend's kernel module for round-to-nearest codes."""
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            s, z = compute_qparams(*min_max(module.weight, w_args), w_args)
            q = QuantLinear.from_linear(module, w_args, s.bfloat16().float(), z, a_args)
            model.model.layers.set_submodule(name, kernel_module_for(q))
    return model


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_decoding_gives_the_eager_tokens_and_compiles_once(tiny_llm_dir, fresh_dynamo):
    model = on_cpu_kernels(AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval())
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4WeightLinear)
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    eager = model.generate(prompt, **greedy)
    assert not counters["stats"]["unique_graphs"]  # eager decoding compiles nothing

    assert hfquant.compile_decoding(model, max_cache_len=32) is model
    compiled = model.generate(prompt, **greedy)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the decode steps were compiled (on a CPU, which transformers skips by default)
    assert torch.equal(compiled, eager)
    shorter = model.generate(prompt[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert counters["stats"]["unique_graphs"] == graphs  # the cache sized by max_cache_len: no recompilation
    assert torch.equal(shorter, model.__class__.generate(model, prompt[:, :4], max_new_tokens=5, min_new_tokens=5,
                                                         do_sample=False, disable_compile=True))


def test_a_copy_of_a_compiled_model_decodes_with_its_own_weights(tiny_llm_dir, fresh_dynamo):
    """transformers keeps the compiled call on the model; a deep copy inherits it, still bound to the original."""
    prompt = torch.tensor([[5, 17, 42, 7]])
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    original = hfquant.compile_decoding(AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval())
    original_tokens = original.generate(prompt, **greedy)
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed.model.norm.weight.neg_()  # every logit negated: greedy picks other tokens
    eager = changed.generate(prompt, disable_compile=True, **greedy)
    assert not torch.equal(eager, original_tokens)
    assert torch.equal(hfquant.compile_decoding(changed).generate(prompt, **greedy), eager)


def test_a_model_that_does_not_generate_is_refused():
    with pytest.raises(CompiledDecodingError, match="Linear does not generate text .*for causal language models"):
        hfquant.compile_decoding(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("bad", [0, 1, 2.5, "64"])
def test_a_cache_length_that_cannot_hold_a_step_is_refused(tiny_llm_dir, bad):
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    with pytest.raises(CompiledDecodingError, match=r"max_cache_len=.*the longest prompt \+ new tokens"):
        hfquant.compile_decoding(model, max_cache_len=bad)
    assert model.generation_config.cache_implementation is None  # refused before anything changed


def test_layers_measured_slower_compiled_are_named(tiny_llm_dir, caplog):
    w8 = QuantArgs(num_bits=8, strategy="channel")
    model = on_cpu_kernels(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), w8,
                           QuantArgs(num_bits=8, strategy="token", dynamic=True))
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        hfquant.compile_decoding(model)
    assert "Int8DynamicLinear layers decoded slower compiled than eager on a CPU" in caplog.text


def test_accelerators_keep_transformers_own_compile_settings():
    assert _compile_config_for("cuda") is None  # transformers compiles there by itself (CUDA graphs)
    cpu = _compile_config_for("cpu")
    assert cpu._compile_all_devices and cpu.mode == "default" and cpu.dynamic is False
