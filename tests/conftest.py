"""Shared fixtures: tiny real transformers models (Llama decoder, BERT encoder) with a real tokenizer trained
offline on the pydoc text, saved as safetensors folders; an isolated hfquant cache."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    """Each test session gets its own baseline/GGUF cache (set before any fixture or subprocess runs), so tests
    never read a user's cache and "computed once" is observable."""
    import tempfile

    global _TEST_CACHE
    _TEST_CACHE = os.environ["HFQUANT_CACHE"] = tempfile.mkdtemp(prefix="hfquant-test-cache-")


_TEST_CACHE = None


def pytest_unconfigure(config):
    """The session's cache (half a GB once the embedded model's GGUF is converted) goes with the session: 200
    runs had left 100 GB in /tmp."""
    import shutil

    if _TEST_CACHE:
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)


def _tokenizer(vocab_size: int = 400):
    from pydoc_data import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [topics.topics[k] for k in sorted(topics.topics)]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tokenizer()


def save_tiny_llama(path, tokenizer, tie_word_embeddings: bool = True, seed: int = 0) -> str:
    """A 2-layer Llama (hidden 64, vocab 400) with random weights, saved with its tokenizer in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie_word_embeddings, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tiny_tokenizer):
    """The tied 2-layer Llama most tests quantize."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer BERT encoder with random weights, saved with its tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256)
    model = BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def compose(overrides):
    """The config `hfquant <overrides>` would run, composed through Hydra from the packaged tree."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from hfquant.config_nodes import register_config_nodes

    register_config_nodes()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hfquant.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def tiny_overrides(model_dir, output_dir, *extra):
    """A quick run on a tiny model: round-to-nearest unless `extra` names an algorithm (the default, GPTQ on
    model-written calibration text plus a round-to-nearest comparison, is exercised by its own tests)."""
    algorithm = [] if any(e.startswith("algorithm=") for e in extra) else ["algorithm=rtn"]
    return [
        "model=hub", f"model.path={model_dir}", "model.name=tiny-llama", f"output_dir={output_dir}",
        "evaluation.seq_len=64", "evaluation.max_windows=4", "calibration.seq_len=64", "calibration.num_samples=4",
        "++evaluation.out_of_domain=none", *extra, *algorithm,
    ]


def fake_distribution(site, name: str, module: str, source: str) -> None:
    """An installed distribution as pip leaves it: a module plus a .dist-info with an `hfquant` entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hfquant]\n{module} = {module}\n")
