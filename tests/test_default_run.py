"""Slow: the real embedded models, end to end, through the console script as a user runs it."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def hfquant(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "hfquant", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "run"
    result = hfquant(f"output_dir={out}")  # everything else is the embedded default
    return out, result


def test_default_run_prints_the_table_offline(default_run):
    out, result = default_run
    for row in ("perplexity", "KL divergence", "top-1 agreement", "size on disk", "bits per parameter"):
        assert row in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["scheme"] == "w4a16" and report["run"]["observer"] == "minmax"
    assert report["run"]["backend"] == "cpu" and "auto" in report["run"]["backend_reason"]
    assert report["protocol"]["windows"] >= 10 and report["protocol"]["seq_len"] == 512
    base = report["baseline"]["perplexity"]["perplexity"]
    assert 5 < base < 30  # SmolLM2-135M on English documentation
    assert report["quantized"]["size"]["bytes_on_disk"] < 0.5 * report["baseline"]["size"]["bytes"]
    assert report["reload_check"]["max_abs_logit_difference"] == 0.0
    assert "Traceback" not in result.stderr
    # The default recipe is AWQ then GPTQ on the mixed calibration set; it beats round-to-nearest in and out of domain.
    assert report["quantization"]["algorithms"] == ["awq", "gptq"]
    generated = report["calibration"]["windows"]["generated"]
    assert generated["windows"] > 0 and "shipped with hfquant" in generated["shipped"]  # not sampled again
    assert "written by the model itself" in (out / "model" / "README.md").read_text()  # the card says so, and where
    assert "shipped with hfquant" in (out / "model" / "README.md").read_text()
    cmp = report["comparison"]
    quant = report["quantized"]["perplexity"]["perplexity"]
    assert quant < cmp["rtn"]["perplexity"]["perplexity"]
    ood = cmp["out_of_domain"]
    assert ood["quantized"]["perplexity"]["perplexity"] < ood["rtn"]["perplexity"]["perplexity"]
    assert "round-to-nearest instead" in result.stdout


def test_default_folder_reloads_through_plain_transformers(default_run):
    out, _ = default_run
    code = ("import torch, hfquant\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r})\n"
            f"t = AutoTokenizer.from_pretrained({str(out / 'model')!r})\n"
            "ids = t('def quantize(x):', return_tensors='pt').input_ids\n"
            "print(type(m.model.layers[0].mlp.down_proj).__name__, m.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.stdout.split() == ["Int4WeightLinear", "True"], result.stderr[-2000:]


def test_the_shipped_windows_are_what_the_embedded_model_writes(default_run):  # after it: its GGUF conversion is cached
    """The default run's model-written calibration windows ship with hfquant (sampling them is the longest part of a
    first run on a CPU): they must be found for the installed model's files, and sampling the first 64 tokens of
    each window again today must give the same tokens."""
    from tests.conftest import compose

    from hfquant.config import validate
    from hfquant.pipeline.generated import RECIPE, calibration_request, generate_windows
    from hfquant.pipeline.load import load_model
    from hfquant.pipeline.shipped_windows import find_shipped

    spec = validate(compose(["output_dir=/nonexistent/unused"]))
    loaded = load_model(spec.model["path"], gguf_file=spec.model["gguf_file"], dtype="float32")
    windows, first = calibration_request(spec, loaded.tokenizer)
    count, seq_len, seed = spec.calibration.generated, windows.input_ids.shape[1], spec.calibration.seed
    shipped = find_shipped(loaded.source, count, seq_len, seed, first, RECIPE)
    assert shipped is not None and shipped.ids.shape == (count, seq_len)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf, sha256 b179c9523d0e6a0f" in shipped.provenance
    assert torch.equal(generate_windows(loaded.model.eval(), count, 64, seed, first), shipped.ids[:, :64])


def test_w8a16_costs_under_one_percent_perplexity(default_run, tmp_path):
    out = tmp_path / "w8"
    hfquant("scheme=w8a16", f"output_dir={out}")
    report = json.loads((out / "report.json").read_text())
    base = report["baseline"]["perplexity"]["perplexity"]
    quant = report["quantized"]["perplexity"]["perplexity"]
    assert quant / base - 1 < 0.01, (base, quant)
    assert report["baseline"]["perplexity"]["cached"]  # computed once, by the default run


def test_encoder_embedding_similarity_on_minilm(tmp_path):
    out = tmp_path / "minilm"
    hfquant("model=minilm", "evaluation=embedding", "scheme=w8a16", "evaluation.max_windows=16", f"output_dir={out}")
    report = json.loads((out / "report.json").read_text())
    emb = report["quantized"]["embedding-similarity"]
    assert emb["cosine_mean"] > 0.99, emb
    from hfquant import load_quantized

    model = load_quantized(str(out / "model"), task="embedding")
    query = model.encoder.layer[0].attention.self.query
    assert type(query).__name__ == "Int8WeightLinear" and query.state_dict()["weight_packed"].dtype == torch.uint8


def test_embedded_model_exports_to_compressed_tensors_and_loads_without_hfquant(tmp_path):
    """576 columns: the default groups of 128 are refused (ragged), with the group size that works; at 64 the folder
    loads in plain transformers without hfquant and generates."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    refused = subprocess.run([sys.executable, "-m", "hfquant", "format=compressed-tensors", f"output_dir={tmp_path / 'x'}"],
                             capture_output=True, text=True, timeout=900, env=env)
    assert refused.returncode == 2 and "scheme.weights.group_size=64 divides every quantized Linear" in refused.stderr
    out = tmp_path / "ct"
    hfquant("format=compressed-tensors", "scheme.weights.group_size=64", "algorithm=rtn", "calibration=none",
            "evaluation.max_windows=2", "evaluation.out_of_domain=none", "evaluation.compare_rtn=false", f"output_dir={out}")
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["check"]["max_abs_logit_difference"] <= 1e-4 and report["export"]["ignore"] == ["lm_head"]
    code = ("import sys; sys.modules['hfquant'] = None\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r})\n"
            f"t = AutoTokenizer.from_pretrained({str(out / 'model')!r})\n"
            "ids = t('def quantize(x):', return_tensors='pt').input_ids\n"
            "print(type(m.config.quantization_config).__name__, m.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.stdout.split()[-2:] == ["CompressedTensorsConfig", "True"], result.stderr[-2000:]


@pytest.mark.parametrize("overrides, kind", [
    (["scheme=w8a8", "format=compressed-tensors"], "int-quantized"),
    (["scheme.weights.group_size=32", "format=gguf", "format.embedding=q8_0"], "gguf"),
], ids=["w8a8-compressed-tensors", "w4a16-gguf-q8-embedding"])
def test_embedded_model_exports_are_checked_by_their_consumer(tmp_path, overrides, kind):
    """The real model through each export the tiny models test: its consumer's logits (no hfquant) equal hfquant's
    reference of the same codes — for w8a8 under transformers' own activation rounding."""
    out = tmp_path / "run"
    hfquant(*overrides, "algorithm=rtn", "calibration=none", "evaluation.max_windows=2", "evaluation.out_of_domain=none",
            "evaluation.compare_rtn=false", f"output_dir={out}")
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["check"]["ok"] and export["check"]["max_abs_logit_difference"] <= 1e-4
    assert export.get("group_format", "gguf") == kind
    if kind == "int-quantized":
        assert "absmax/127.5" in export["check"]["against"]
        assert "absmax/127" in (out / "model" / "README.md").read_text()
