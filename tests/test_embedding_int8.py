"""`scheme.embedding=int8`: the input embedding as int8 codes with one scale per row; a tied lm_head uses the
same codes and scales (shared in memory on the cpu backend), an untied one gets its own; the folder reloads
with transformers to the same logits, and what cannot hold it says so before any work."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.config import ConfigError
from hfquant.formats.kernels import Int8Embedding, Int8WeightLinear
from hfquant.formats.qembedding import QuantEmbedding
from hfquant.pipeline.run import run
from hfquant.pipeline.streaming import StreamingError
from tests.conftest import compose, save_tiny_llama, tiny_overrides


@pytest.fixture(scope="module")
def untied_llm_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("untied-llama"), tiny_tokenizer, tie_word_embeddings=False, seed=1)


def quantize(model_dir, out, backend, *extra):
    return run(compose(tiny_overrides(model_dir, out, "scheme=w4a16", "scheme.weights.group_size=32",
                                      "scheme.embedding=int8", f"backend={backend}", *extra)))


@pytest.mark.parametrize("backend, embedding_cls, head_cls", [("fake", "QuantEmbedding", "QuantLinear"),
                                                               ("cpu", "Int8Embedding", "Int8WeightLinear")])
def test_tied_embedding_and_lm_head_share_codes_and_reload_exactly(tiny_llm_dir, tmp_path, backend, embedding_cls,
                                                                   head_cls):
    out = tmp_path / "run"
    report = quantize(tiny_llm_dir, out, backend)
    assert report["reload_check"]["max_abs_logit_difference"] == 0.0
    entry = report["quantization"]["embedding"]
    assert entry["module"] == "model.embed_tokens" and entry["head"] == "lm_head" and "tied" in entry["lm_head"]
    vocab, hidden = 400, 64
    assert entry["float_bytes"] == vocab * hidden * 4 and entry["bytes"] == vocab * hidden + vocab * (4 + 1)
    config = json.loads((out / "model" / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    assert modules["model.embed_tokens"]["kind"] == "embedding" and modules["lm_head"]["tied_to"] == "model.embed_tokens"
    assert config["tie_word_embeddings"] is False  # transformers cannot tie modules without a `weight`

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    embedding, head = model.model.embed_tokens, model.lm_head
    assert (type(embedding).__name__, type(head).__name__) == (embedding_cls, head_cls)
    codes = embedding.codes()
    assert torch.equal(codes, head.codes()) and codes.dtype == torch.int8
    assert torch.equal(embedding.weight_scale.reshape(-1), head.weight_scale.reshape(-1))
    if backend == "cpu":
        assert head.weight_int8 is embedding.weight_int8  # one int8 tensor in memory
    # the looked-up rows are the dequantized codes, within half a step of the float embedding
    original = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).model.embed_tokens.weight.detach()
    ids = torch.arange(vocab)[None]
    looked_up = embedding(ids)[0]
    assert torch.allclose(looked_up, codes.float() * embedding.weight_scale, atol=0)
    assert float((looked_up - original).abs().max()) <= float(embedding.weight_scale.max()) / 2 + 1e-7


def test_untied_lm_head_gets_its_own_codes(untied_llm_dir, tmp_path):
    report = quantize(untied_llm_dir, tmp_path / "run", "cpu")
    assert report["reload_check"]["max_abs_logit_difference"] == 0.0
    assert "its own codes" in report["quantization"]["embedding"]["lm_head"]
    modules = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["quantization_config"]["modules"]
    assert "tied_to" not in modules["lm_head"] and modules["model.embed_tokens"]["kind"] == "embedding"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert isinstance(model.model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8WeightLinear)
    assert not torch.equal(model.lm_head.codes(), model.model.embed_tokens.codes())
    model.to(torch.float16)  # the looked-up rows follow the cast; the int8 table and its scales stay as they are
    assert model.model.embed_tokens(torch.tensor([[1, 2]])).dtype == torch.float16
    assert model.model.embed_tokens.weight_scale.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.float16


def test_resident_bytes_of_embedding_and_tied_head_are_one_int8_table():
    torch.manual_seed(0)
    from hfquant.formats.kernels import embedding_kernel_for, kernel_module_for, share_tied_codes
    from hfquant.formats.qembedding import EMBEDDING_SCHEMES
    from hfquant.formats.qlinear import QuantLinear

    emb = torch.nn.Embedding(1000, 64)
    q = QuantEmbedding.from_embedding(emb, EMBEDDING_SCHEMES["int8"])
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"embed": embedding_kernel_for(q), "head": kernel_module_for(QuantLinear.from_linear(
        head, q.weight_args, q.weight_scale, q.weight_zero_point, codes=q.codes()))})
    share_tied_codes(model, {"head": "embed"})
    resident = {t.data_ptr(): t.numel() * t.element_size() for t in model.buffers()}
    assert sum(resident.values()) <= 0.3 * emb.weight.numel() * 4  # one int8 table + scales, vs float32


@pytest.mark.parametrize("overrides, error, message", [
    (["format=gguf"], ConfigError, r"format.embedding=q8_0 instead of scheme.embedding"),
    (["format=compressed-tensors"], ConfigError, r"set scheme.embedding=null"),
    (["scheme=nf4", "backend=bitsandbytes"], ConfigError, r"keeps embeddings in floating point"),
    (["pipeline=streaming", "evaluation=none"], StreamingError, r"scheme.embedding=int8 is quantized in memory"),
    (["scheme.embedding=int4"], ConfigError, r"embedding must be int8 .* or null"),
])
def test_what_cannot_hold_an_int8_embedding_says_so_first(tiny_llm_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'x'}", "scheme.embedding=int8",
                     *overrides]))
    assert not (tmp_path / "x" / "model").exists()


def test_resume_reports_the_embedding_as_the_first_run_did(tiny_llm_dir, tmp_path):
    first = quantize(tiny_llm_dir, tmp_path / "run", "cpu")
    again = quantize(tiny_llm_dir, tmp_path / "run", "cpu", "resume=true")
    assert again["quantization"]["embedding"] == first["quantization"]["embedding"]
    assert again["quantization"]["modules"] == first["quantization"]["modules"]
    assert again["reload_check"]["ok"] and again["quantized"]["perplexity"] == first["quantized"]["perplexity"]


@pytest.mark.parametrize("extra", [["scheme=w8a16", "scheme.ignore=[]", "scheme.embedding=int8"],
                                   ["scheme=w8a16", "scheme.ignore=[]", "scheme.embedding=null", "pipeline=in_memory"]],
                         ids=["scheme-quantizes-the-head-and-the-embedding", "scheme-quantizes-the-tied-head"])
def test_a_tied_model_whose_head_the_scheme_quantizes_reloads(tiny_llm_dir, tmp_path, extra):
    """transformers ties by assigning `weight`, which quantized modules lack: the folder is saved untied."""
    report = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "backend=cpu", *extra)))
    assert report["reload_check"]["max_abs_logit_difference"] == 0.0
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" in config["quantization_config"]["modules"]
    if "scheme.embedding=int8" in extra:
        assert report["quantization"]["embedding"]["lm_head"] == "quantized by the scheme"
        again = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "backend=cpu", *extra, "resume=true")))
        assert again["quantization"]["embedding"] == report["quantization"]["embedding"]
        assert again["quantization"]["modules"] == report["quantization"]["modules"] == 15


def test_folders_with_an_embedding_entry_are_format_version_3(tiny_llm_dir, tmp_path):
    quantize(tiny_llm_dir, tmp_path / "emb", "fake")
    assert json.loads((tmp_path / "emb" / "model" / "config.json").read_text())["quantization_config"]["format_version"] == 3
    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "plain", "scheme=w8a16", "backend=fake")))
    assert json.loads((tmp_path / "plain" / "model" / "config.json").read_text())["quantization_config"]["format_version"] == 2


def test_the_round_to_nearest_comparison_quantizes_the_embedding_too(tiny_llm_dir):
    """Otherwise the 'round-to-nearest instead' row would charge the int8 embedding's cost to the algorithms."""
    from hfquant.config import validate
    from hfquant.pipeline.compare import rtn_reference

    spec = validate(compose(tiny_overrides(tiny_llm_dir, "/tmp/x", "scheme=w8a16", "scheme.embedding=int8")))
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    rtn = rtn_reference(model, spec, "cpu")
    assert isinstance(rtn.model.embed_tokens, Int8Embedding) and isinstance(rtn.lm_head, Int8WeightLinear)
    assert rtn.lm_head.weight_int8 is rtn.model.embed_tokens.weight_int8
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)  # the run's own model is untouched
