"""`hfquant.compile_decoding`: transformers' static cache with compiled decode steps, on the CPU too — the same
greedy tokens as eager decoding for a folder hfquant saved, one compilation reused across calls, an undo that
keeps saved folders clean, and clear refusals where transformers would silently not compile."""

import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.decoding import CompiledDecodingError, _compile_config_for
from hfquant.formats import QuantLinear, kernels
from hfquant.formats.kernels import Int4WeightLinear, kernel_module_for
from hfquant.pipeline.run import run
from hfquant.quant import QuantArgs, compute_qparams, min_max
from tests.conftest import compose, tiny_overrides

GREEDY = dict(do_sample=False)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def saved_folder(tiny_llm_dir, out, *overrides) -> str:
    run(compose(tiny_overrides(tiny_llm_dir, out, *overrides)))
    return str(out / "model")


def test_a_saved_cpu_folder_decodes_compiled_with_the_eager_tokens(tiny_llm_dir, tmp_path, fresh_dynamo):
    folder = saved_folder(tiny_llm_dir, tmp_path / "run", "scheme=w4a16", "scheme.weights.group_size=32", "backend=cpu")
    model = AutoModelForCausalLM.from_pretrained(folder)  # as the model card loads it: with hfquant's quantizer
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4WeightLinear) and model.hf_quantizer.is_compileable
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    eager = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, **GREEDY)
    assert not counters["stats"]["unique_graphs"]  # eager decoding compiles nothing

    assert hfquant.compile_decoding(model, max_cache_len=32) is model
    compiled = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, **GREEDY)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the decode steps were compiled (on a CPU, which transformers skips by default)
    assert torch.equal(compiled, eager)
    longer = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, **GREEDY)  # 26 positions ≤ 32
    assert counters["stats"]["unique_graphs"] == graphs  # the cache sized by max_cache_len: no recompilation
    assert torch.equal(longer, model.generate(prompt, max_new_tokens=20, min_new_tokens=20, disable_compile=True,
                                              **GREEDY))

    hfquant.eager_decoding(model)
    assert model.generation_config.cache_implementation is None and model.generation_config.max_cache_len is None
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "generation_config.json").read_text())
    assert "cache_implementation" not in saved and "max_cache_len" not in saved  # loaders are not told to go static


def test_a_copy_of_a_compiled_model_decodes_with_its_own_weights(tiny_llm_dir, fresh_dynamo):
    """transformers keeps the compiled call on the model; a deep copy inherits it, still bound to the original."""
    prompt = torch.tensor([[5, 17, 42, 7]])
    greedy = dict(max_new_tokens=6, min_new_tokens=6, **GREEDY)
    original = hfquant.compile_decoding(AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval())
    original_tokens = original.generate(prompt, **greedy)
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed.model.norm.weight.neg_()  # every logit negated: greedy picks other tokens
    eager = changed.generate(prompt, disable_compile=True, **greedy)
    assert not torch.equal(eager, original_tokens)
    assert torch.equal(hfquant.compile_decoding(changed).generate(prompt, **greedy), eager)


def test_a_folder_transformers_will_not_compile_is_refused(tiny_llm_dir, tmp_path):
    folder = saved_folder(tiny_llm_dir, tmp_path / "bnb", "scheme=llm-int8", "backend=bitsandbytes")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(CompiledDecodingError, match="does not compile models quantized by bitsandbytes: decode "
                                                    "without compile_decoding"):
        hfquant.compile_decoding(model)
    assert model.generation_config.cache_implementation is None  # refused before anything changed


def test_an_offloaded_model_is_refused(tiny_llm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "disk"}  # what device_map offloading sets
    with pytest.raises(CompiledDecodingError, match=r"offloaded to the CPU or disk .*load it on one device"):
        hfquant.compile_decoding(model)


def test_a_model_that_does_not_generate_is_refused():
    with pytest.raises(CompiledDecodingError, match="Linear does not generate text .*for causal language models"):
        hfquant.compile_decoding(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("bad", [0, 1, 2.5, "64", True])
def test_a_cache_length_that_cannot_hold_a_step_is_refused(tiny_llm_dir, bad):
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    with pytest.raises(CompiledDecodingError, match=r"max_cache_len=.*the longest prompt \+ new tokens"):
        hfquant.compile_decoding(model, max_cache_len=bad)
    assert model.generation_config.cache_implementation is None


def on_cpu_kernels(model, w_args, a_args=None):
    """Every decoder Linear replaced by the `cpu` backend's kernel module for round-to-nearest codes."""
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            s, z = compute_qparams(*min_max(module.weight, w_args), w_args)
            model.model.layers.set_submodule(name, kernel_module_for(QuantLinear.from_linear(module, w_args, s, z, a_args)))
    return model


@pytest.mark.parametrize("int8_dot_products", [False, True], ids=["avx2", "vnni"])
def test_w8a8_decodes_compiled_on_either_integer_path(tiny_llm_dir, monkeypatch, fresh_dynamo, int8_dot_products):
    """w8a8's per-token quantization and integer sums compile on both of its decode kernels (`_int_mm` with int8 dot
    products, torch's int8-weight kernel without): the compiled steps give eager's logits, up to an activation code
    that rounds the other way in a fused division."""
    monkeypatch.setattr(kernels, "_INT8_FAST", int8_dot_products)
    model = on_cpu_kernels(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), QuantArgs(num_bits=8, strategy="channel"),
                           QuantArgs(num_bits=8, strategy="token", dynamic=True))
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    steps = dict(max_new_tokens=4, min_new_tokens=4, output_logits=True, return_dict_in_generate=True, **GREEDY)
    eager = model.generate(prompt, **steps)
    compiled = hfquant.compile_decoding(model, max_cache_len=16).generate(prompt, **steps)
    assert counters["stats"]["unique_graphs"] > 0
    compared = 0
    for step, (e, c) in enumerate(zip(eager.logits, compiled.logits)):
        if not torch.equal(eager.sequences[:, :prompt.shape[1] + step], compiled.sequences[:, :prompt.shape[1] + step]):
            break  # a different earlier token: later steps see different inputs
        assert float((c - e).norm() / e.norm()) < 1e-2, step
        compared += 1
    assert compared >= 2  # the prompt's (eager) step and at least one compiled decode step


def test_accelerators_keep_transformers_own_compile_settings():
    assert all(_compile_config_for(device) is None for device in ("cuda", "xpu", "neuron", "tpu"))
    cpu = _compile_config_for("cpu")
    assert cpu._compile_all_devices and cpu.mode == "default" and cpu.dynamic is False
