"""Shipped model-written windows stand in for sampling only for the exact weights and request they were made
for; anything else (other weights of the same size, another seed, autocast, damaged tokens) samples as before."""

import logging
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.pipeline import shipped_windows
from hfquant.pipeline.data import Windows
from hfquant.pipeline.generated import RECIPE, first_tokens_for, with_generated
from hfquant.pipeline.shipped_windows import find_shipped, write_shipped


@pytest.fixture
def model(tiny_llm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr(shipped_windows, "SHIPPED_DIR", str(folder))
    return folder


def dataset_windows(vocab: int) -> Windows:
    ids = torch.randint(3, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    return Windows(ids, {"dataset": {"name": "test"}, "num_samples": 3}, 0)


def run(model, fingerprint, source, seed=0, autocast=None):
    """(windows, how many forwards the model ran while they were made)."""
    forwards = []
    handle = model.lm_head.register_forward_hook(lambda *_: forwards.append(1))
    try:
        windows = with_generated(model, fingerprint, dataset_windows(model.config.vocab_size), 2, seed, autocast,
                                 weights_source=source)
        return windows, len(forwards)
    finally:
        handle.remove()


def ship(model, source, folder, seed=0) -> torch.Tensor:
    """Samples as a run would (under its own fingerprint) and ships the result for `source`'s weights."""
    sampled, _ = run(model, f"{folder}-ship-{seed}", None, seed)
    first = first_tokens_for(dataset_windows(model.config.vocab_size), 2, seed)
    write_shipped(str(folder / f"generated-tiny-seed{seed}.safetensors"), sampled.input_ids[3:], source, seed, first,
                  RECIPE)
    return sampled.input_ids


def test_the_exact_weights_and_request_use_the_shipped_tokens_without_sampling(model, tiny_llm_dir, shipped_dir):
    expected = ship(model, tiny_llm_dir, shipped_dir)
    windows, forwards = run(model, f"{shipped_dir}-run", tiny_llm_dir)
    assert forwards == 0 and torch.equal(windows.input_ids, expected)
    provenance = windows.protocol["generated"]["shipped"]
    assert "sampled once from the source model's weights (model.safetensors, sha256 " in provenance
    assert "shipped with hfquant (generated-tiny-seed0.safetensors)" in provenance
    assert windows.protocol["token_sha256"] == Windows(expected, {}, 0).token_hash
    # looked up again next time (not copied into the cache), so the report says where they came from every run
    again, forwards = run(model, f"{shipped_dir}-run", tiny_llm_dir)
    assert forwards == 0 and "shipped" in again.protocol["generated"]


@pytest.mark.parametrize("edit", ["one weight bit", "generation config beside the weights"])
def test_other_files_of_the_same_size_sample_for_themselves(model, tiny_llm_dir, shipped_dir, tmp_path, edit):
    ship(model, tiny_llm_dir, shipped_dir)
    other = tmp_path / "other"
    shutil.copytree(tiny_llm_dir, other)
    assert run(model, f"{shipped_dir}-copy", str(other))[1] == 0  # a byte-identical copy elsewhere: found
    if edit == "generation config beside the weights":  # it can change what sampling draws
        (other / "generation_config.json").write_text('{"repetition_penalty": 1.3}')
        windows, forwards = run(model, f"{shipped_dir}-other", str(other))
        assert forwards > 0 and "shipped" not in windows.protocol["generated"]
        return
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: same names, same sizes, another sha256
    weights.write_bytes(bytes(data))
    windows, forwards = run(model, f"{shipped_dir}-other", str(other))
    assert forwards > 0 and "shipped" not in windows.protocol["generated"]


@pytest.mark.parametrize("change", ["seed", "autocast", "bfloat16 model", "no local files"])
def test_another_request_samples(model, tiny_llm_dir, shipped_dir, change):
    ship(model, tiny_llm_dir, shipped_dir)
    seed, autocast, source = 0, None, tiny_llm_dir
    if change == "seed":
        seed = 1
    elif change == "autocast":
        autocast = torch.bfloat16
    elif change == "bfloat16 model":  # the same files loaded in another dtype sample other tokens
        model = model.to(torch.bfloat16)
    else:
        source = "HuggingFaceTB/SmolLM2-135M"  # a Hub id: nothing on disk to identify the weights by
    windows, forwards = run(model, f"{shipped_dir}-run", source, seed, autocast)
    assert forwards > 0 and "shipped" not in windows.protocol["generated"]


def test_tokens_that_do_not_match_their_hash_are_ignored_with_a_warning(model, tiny_llm_dir, shipped_dir, caplog):
    ship(model, tiny_llm_dir, shipped_dir)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = str(next(shipped_dir.glob("*.safetensors")))
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    ids = load_file(path)["input_ids"]
    ids[0, 5] += 1
    save_file({"input_ids": ids}, path, metadata=meta)
    first = first_tokens_for(dataset_windows(model.config.vocab_size), 2, 0)
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        assert find_shipped(tiny_llm_dir, 2, 16, 0, first, RECIPE) is None
    assert "do not match their recorded hash" in caplog.text


def test_a_damaged_shipped_file_is_ignored_with_a_warning(tiny_llm_dir, shipped_dir, caplog):
    (shipped_dir / "generated-broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        assert find_shipped(tiny_llm_dir, 2, 16, 0, torch.tensor([5, 6]), RECIPE) is None
    assert "generated-broken.safetensors" in caplog.text and "sampling instead" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_a_model_on_cuda_samples_there(model, tiny_llm_dir, shipped_dir):
    ship(model, tiny_llm_dir, shipped_dir)
    windows, forwards = run(model.to("cuda"), f"{shipped_dir}-cuda", tiny_llm_dir)
    assert forwards > 0 and "shipped" not in windows.protocol["generated"]


def test_the_cache_keys_users_already_have_are_unchanged():
    """RECIPE now also names shipped files; the cache key of a float32 run must stay what earlier versions wrote
    (the value computed with the formula of 096af65, before the constant existed)."""
    from hfquant.pipeline.generated import _cache_path

    path = _cache_path("0123456789abcdef", 16, 512, 0, torch.tensor([1, 2, 3]), torch.float32, None)
    assert os.path.basename(path) == "generated-6fbda4dcb9d9500040b215e8.pt"


def test_writing_needs_weight_files_to_identify_the_model(tmp_path):
    with pytest.raises(ValueError, match="holds no .gguf or .safetensors weights"):
        write_shipped(str(tmp_path / "x.safetensors"), torch.zeros(1, 4, dtype=torch.long), str(tmp_path), 0,
                      torch.tensor([1]), RECIPE)
