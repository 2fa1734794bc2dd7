"""The whole pipeline on a tiny Llama: every built-in scheme saves, reloads through plain transformers with
the same logits, and reports honest numbers; output folders are never clobbered or left looking complete."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.formats import QuantLinear
from hfquant.pipeline import evaluate as evaluate_mod
from hfquant.pipeline.output import OutputExistsError
from hfquant.pipeline.run import run
from tests.conftest import compose, tiny_overrides

SCHEMES = ["w8a16", "w4a16", "w4a16-asym", "w8a8", "w8a8-static", "int8-tensor"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_builtin_scheme_reloads_through_transformers(tiny_llm_dir, tmp_path, scheme):
    out = tmp_path / "run"
    extra = ["scheme.weights.group_size=32"] if scheme.startswith("w4a16") else []
    report = run(compose(tiny_overrides(tiny_llm_dir, out, f"scheme={scheme}", "backend=fake", *extra)))
    assert report["reload_check"]["ok"] and report["reload_check"]["max_abs_logit_difference"] == 0.0
    cfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hfquant" and cfg["format_version"] == 2 and cfg["scheme"] == scheme
    assert "lm_head" not in cfg["modules"] and len(cfg["modules"]) == 14  # 7 Linear per layer × 2 layers
    # Plain transformers, after `import hfquant`:
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.weight_packed.dtype == torch.uint8
    if scheme.startswith("w4"):
        assert q_proj.weight_packed.shape[1] == q_proj.in_features // 2  # two int4 codes per byte
    ids = torch.arange(1, 40)[None]
    again = hfquant.load_quantized(str(out / "model"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    q = report["quantized"]["perplexity"]
    assert 0 <= q["kl_divergence"] and 0 < q["top1_agreement"] <= 1
    assert report["quantized"]["size"]["bits_per_parameter"] < report["baseline"]["size"]["bits_per_parameter"]
    assert (out / "report.md").read_text().startswith("# hfquant report")
    if scheme == "w8a8-static":
        assert "static activations observed" in report["calibration"]["status"]
        assert float(q_proj.input_scale) > 0
    else:
        assert report["calibration"]["status"].startswith("skipped")


def test_int8_costs_less_than_int4(tiny_llm_dir, tmp_path):
    r8 = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "a", "scheme=w8a16")))
    r4 = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "b", "scheme=w4a16", "scheme.weights.group_size=32")))
    assert r8["quantized"]["perplexity"]["kl_divergence"] < r4["quantized"]["perplexity"]["kl_divergence"]
    assert r8["quantization"]["weight_sqnr_db"] > r4["quantization"]["weight_sqnr_db"] + 15
    assert r8["quantized"]["perplexity"]["top1_agreement"] > 0.9


def test_existing_output_is_refused_then_overwritten_only_when_asked(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    before = (out / "report.json").read_text()
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "scheme.weights.group_size=32")))
    assert (out / "report.json").read_text() == before
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "scheme.weights.group_size=32", "overwrite=true")))
    assert json.loads((out / "report.json").read_text())["run"]["scheme"] == "w4a16"
    assert sorted(p.name for p in out.iterdir()) == [".hfquant-resume.json", "model", "report.json", "report.md"]


def test_interrupted_run_never_looks_complete(tiny_llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("hfquant.pipeline.run.evaluate_quantized", boom)
    with pytest.raises(KeyboardInterrupt):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    assert not (out / "report.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".model.partial")]


def test_interrupted_save_leaves_no_model_folder(tiny_llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    from transformers import PreTrainedModel

    def fail(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    assert sorted(p.name for p in out.iterdir()) == []


def test_resume_reuses_the_quantization_and_reevaluates(tiny_llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    mtime = os.path.getmtime(out / "model" / "model.safetensors")
    monkeypatch.setattr("hfquant.pipeline.run.build_plan", lambda *a, **k: pytest.fail("resume must not re-quantize"))
    second = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "resume=true")))
    assert os.path.getmtime(out / "model" / "model.safetensors") == mtime
    assert second["quantized"]["perplexity"]["perplexity"] == pytest.approx(first["quantized"]["perplexity"]["perplexity"])
    assert "reused" in second["calibration"]["status"]


def test_resume_without_a_finished_model_is_refused(tiny_llm_dir, tmp_path):
    with pytest.raises(OutputExistsError, match="no finished model"):
        run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "none", "resume=true")))


def test_baseline_is_computed_once_per_model_data_and_protocol(tiny_llm_dir, tmp_path, monkeypatch):
    calls = []
    real = evaluate_mod.evaluate_baseline

    def counting(model, windows, evaluators, fingerprint, use_cache=True, ranks=None):
        result = real(model, windows, evaluators, fingerprint, use_cache, ranks)
        calls.append(all(v.get("cached") for v in result.values()))
        return result

    monkeypatch.setattr("hfquant.pipeline.run.evaluate_baseline", counting)
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "a", "scheme=w8a16")))
    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "b", "scheme=int8-tensor", "observer=mse")))
    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "c", "scheme=w8a16", "evaluation.max_windows=3")))
    assert calls == [False, True, False]  # a different protocol (3 windows) is a different baseline


def test_weight_only_run_without_data(tiny_llm_dir, tmp_path):
    overrides = ["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'r'}", "scheme=w8a16",
                 "calibration=none", "algorithm=rtn", "evaluation=none"]
    report = run(compose(overrides))
    assert report["quantized"]["size"]["bytes_on_disk"] > 0 and "perplexity" not in report["quantized"]
    assert (tmp_path / "r" / "model" / "config.json").exists()


def test_embedding_model_is_evaluated_by_cosine(tiny_bert_dir, tmp_path):
    overrides = ["model=minilm", f"model.path={tiny_bert_dir}", f"output_dir={tmp_path / 'bert'}", "scheme=w8a16",
                 "evaluation=embedding", "evaluation.seq_len=32", "evaluation.max_windows=8", "algorithm=rtn"]
    report = run(compose(overrides))
    emb = report["quantized"]["embedding-similarity"]
    assert 0.99 < emb["cosine_mean"] <= 1.0 + 1e-6 and emb["cosine_min"] <= emb["cosine_mean"]
    again = hfquant.load_quantized(str(tmp_path / "bert" / "model"), task="embedding")
    query = again.encoder.layer[0].attention.self.query  # auto picked the cpu kernels
    assert type(query).__name__ == "Int8WeightLinear" and query.state_dict()["weight_packed"].dtype == torch.uint8
