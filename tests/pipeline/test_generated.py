"""Calibration text the model writes itself: what it is sampled in, and that each choice is cached on its own."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.config import ConfigError, validate
from hfquant.formats import kernels
from hfquant.pipeline.data import Windows
from hfquant.pipeline.generated import sampling_dtype, with_generated
from tests.conftest import compose


@pytest.fixture(scope="module")
def model(tiny_llm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()


def dataset_windows(vocab: int) -> Windows:
    ids = torch.randint(3, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    return Windows(ids, {"dataset": {"name": "test"}, "num_samples": 3}, 0)


@pytest.mark.parametrize("fast_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_samples_a_float32_model_in_bfloat16_only_where_the_cpu_has_bf16_dot_products(model, monkeypatch,
                                                                                           fast_bf16, expected):
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: fast_bf16)
    assert sampling_dtype(model) == expected
    assert sampling_dtype(model, "float32") == torch.float32 and sampling_dtype(model, "bfloat16") == torch.bfloat16


def test_a_bfloat16_model_samples_in_its_own_dtype(tiny_llm_dir, monkeypatch):
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: False)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.bfloat16)
    assert sampling_dtype(bf16) == torch.bfloat16


def test_each_sampling_dtype_computes_in_it_and_is_cached_on_its_own(model):
    seen = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        windows = dataset_windows(model.config.vocab_size)
        as_float = with_generated(model, "fp-test", windows, 2, 0, "float32")
        used_float = set(seen)
        seen.clear()
        as_bf16 = with_generated(model, "fp-test", windows, 2, 0, "bfloat16")
        used_bf16 = set(seen)
        seen.clear()
        again = with_generated(model, "fp-test", windows, 2, 0, "float32")
    finally:
        handle.remove()
    assert used_float == {torch.float32} and used_bf16 == {torch.bfloat16}
    assert not seen and torch.equal(again.input_ids, as_float.input_ids)  # read from the cache: no forward ran
    assert as_float.input_ids.shape == as_bf16.input_ids.shape == (5, 16)
    assert torch.equal(as_float.input_ids[:3], windows.input_ids)
    assert as_float.protocol["generated"]["computed_in"] == "float32"
    assert as_bf16.protocol["generated"]["computed_in"] == "bfloat16"


def test_an_unknown_sampling_dtype_is_refused_at_config_time(tiny_llm_dir):
    with pytest.raises(ConfigError, match=r"calibration.generated_dtype must be one of auto, float32, bfloat16"):
        validate(compose(["model=hub", f"model.path={tiny_llm_dir}", "output_dir=/tmp/x", "algorithm=gptq",
                          "calibration.generated_dtype=fp16"]))
