"""Windows evaluated in batches give the same perplexity, KL and top-1 as one window at a time (same length,
so no padding; each window's record comes from its own rows of the batch's logits)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.config import ConfigError, validate
from hfquant.pipeline.data import evaluation_windows
from hfquant.pipeline.evaluate import make_evaluators
from hfquant.plugins import registries
from tests.conftest import compose


@pytest.fixture(scope="module")
def models_and_windows(tiny_llm_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    noisy = copy.deepcopy(base)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # a stand-in for a quantized model: a different output distribution
    stream = torch.randint(2, base.config.vocab_size, (7 * 64,))
    return base, noisy, evaluation_windows(stream, seq_len=64, max_windows=None)


def evaluate(model, windows, batch_size, reference=None):
    return registries().evaluators.get("perplexity")(batch_size=batch_size).evaluate(model, windows, reference=reference)


@pytest.mark.parametrize("batch_size", [2, 3, 7, 16])
def test_batches_give_the_same_numbers_as_one_window_at_a_time(models_and_windows, batch_size):
    base, noisy, windows = models_and_windows
    one_ref, batch_ref = evaluate(base, windows, 1), evaluate(base, windows, batch_size)
    assert batch_ref["perplexity"] == pytest.approx(one_ref["perplexity"], rel=1e-6)
    for a, b in zip(one_ref["_top_idx"], batch_ref["_top_idx"]):
        assert torch.equal(a, b)
    one, batched = evaluate(noisy, windows, 1, one_ref), evaluate(noisy, windows, batch_size, one_ref)
    assert batched["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
    assert batched["kl_divergence"] == pytest.approx(one["kl_divergence"], rel=1e-5, abs=1e-9)
    assert batched["top1_agreement"] == one["top1_agreement"] and batched["scored_tokens"] == one["scored_tokens"] == 7 * 63
    assert 0 < one["kl_divergence"] and one["top1_agreement"] < 1  # the comparison compared something


def test_auto_is_one_window_per_forward_on_cpu_and_up_to_eight_on_accelerators():
    ev = registries().evaluators.get("perplexity")()
    assert ev.windows_per_forward("cpu") == 1 and ev.windows_per_forward("cuda:0", 512, 49152) == 8
    assert ev.windows_per_forward("cuda:0", 2048, 128256) == 1  # the logits budget, not a fixed 8
    assert registries().evaluators.get("perplexity")(batch_size=5).windows_per_forward("cpu") == 5


def test_evaluation_batch_size_reaches_the_evaluators_that_take_it(tiny_llm_dir):
    spec = validate(compose(["model=hub", f"model.path={tiny_llm_dir}", "output_dir=/tmp/x", "evaluation.batch_size=4"]))
    assert spec.evaluation.batch_size == 4
    assert make_evaluators(["perplexity"], batch_size=spec.evaluation.batch_size)["perplexity"].batch_size == 4
    assert validate(compose(["model=hub", f"model.path={tiny_llm_dir}", "output_dir=/tmp/x"])).evaluation.batch_size is None  # auto
    with pytest.raises(ConfigError, match=r"evaluation.batch_size must be a positive integer or auto"):
        validate(compose(["model=hub", f"model.path={tiny_llm_dir}", "output_dir=/tmp/x", "evaluation.batch_size=0"]))
