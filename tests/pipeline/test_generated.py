"""Calibration text the model writes itself: sampled in the model's dtype unless a float32 model is autocast
down, each way cached on its own, global random state left alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.pipeline.data import Windows
from hfquant.pipeline.generated import generate_windows, with_generated


@pytest.fixture(scope="module")
def model(tiny_llm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()


def dataset_windows(vocab: int) -> Windows:
    ids = torch.randint(3, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    return Windows(ids, {"dataset": {"name": "test"}, "num_samples": 3}, 0)


def sampled(model, autocast=None, fingerprint="fp-test"):
    """(windows, the dtypes lm_head computed in while they were made)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        return with_generated(model, fingerprint, dataset_windows(model.config.vocab_size), 2, 0, autocast), set(seen)
    finally:
        handle.remove()


def test_autocast_and_model_dtypes_each_compute_in_it_and_are_cached_on_their_own(model, tiny_llm_dir):
    as_float, used = sampled(model)
    assert used == {torch.float32} and as_float.protocol["generated"]["computed_in"] == "float32"
    as_bf16, used = sampled(model, torch.bfloat16)
    assert used == {torch.bfloat16} and as_bf16.protocol["generated"]["computed_in"] == "bfloat16"
    again, used = sampled(model)
    assert not used and torch.equal(again.input_ids, as_float.input_ids)  # read from the cache: no forward ran
    bf16_model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.bfloat16).eval()
    native, used = sampled(bf16_model)  # same checkpoint (fingerprint), loaded in bf16: not the float32 cache
    assert used == {torch.bfloat16} and native.protocol["generated"]["computed_in"] == "bfloat16"
    assert as_float.input_ids.shape == as_bf16.input_ids.shape == (5, 16)
    assert torch.equal(as_float.input_ids[:3], dataset_windows(model.config.vocab_size).input_ids)


def test_autocast_only_lowers_a_float32_model(tiny_llm_dir):
    bf16_model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.bfloat16).eval()
    with pytest.raises(ValueError, match="autocast samples a float32 model in bfloat16 or float16; this model is "
                                         "torch.bfloat16"):
        generate_windows(bf16_model, 1, 4, 0, torch.tensor([5]), torch.float32)


def test_sampling_leaves_the_global_random_state_alone(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_windows(model, 1, 4, 0, torch.tensor([5]))
    assert torch.equal(torch.rand(3), expected)


def test_sampling_shows_its_progress_and_draws_the_same_tokens_as_without(model, monkeypatch):
    from hfquant.pipeline import generated

    bars = []

    class Recorded(generated.StepProgress):
        def __init__(self, steps):
            super().__init__(steps)
            bars.append(self.bar)

    monkeypatch.setattr(generated, "StepProgress", Recorded)
    shown = generate_windows(model, 2, 6, 0, torch.tensor([5, 6]))
    assert [(bar.n, bar.total) for bar in bars] == [(5, 5)]  # one tick per sampled token, not for the prompt
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = model.generate(torch.tensor([[5], [6]]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=5, min_new_tokens=5, attention_mask=torch.ones(2, 1, dtype=torch.long))
    assert torch.equal(shown, plain)
