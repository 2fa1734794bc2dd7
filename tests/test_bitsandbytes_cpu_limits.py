"""bitsandbytes' 4-bit CPU kernel (taken on CPUs with AVX512-BF16) cannot run every Linear shape: hfquant leaves
those Linears unquantized on every CPU, says so in the report, and refuses when nothing would be left to quantize.
Both kinds of CPU are covered by forcing bitsandbytes' own capability check (`has_avx512bf16`) off and on."""

import json

import pytest
import torch

from hfquant.config import ConfigError
from hfquant.pipeline.run import run
from hfquant_builtins.backends.bitsandbytes import cpu_4bit_problem
from tests.conftest import compose, tiny_overrides


def machine_has_avx512_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def force_cpu_kernel(monkeypatch, on: bool) -> None:
    """What `Linear4bit.__init__` reads to choose the AVX512-BF16 repacked kernel."""
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: on)


def test_the_limit_hfquant_guards_against_is_real(monkeypatch):
    """A canary: if bitsandbytes learns these shapes, this fails and hfquant's rule (cpu_4bit_problem) can go.
    The crash is in the Python repacking, before any AVX512 instruction runs, so it is safe on every CPU."""
    import bitsandbytes as bnb

    force_cpu_kernel(monkeypatch, True)
    layer = bnb.nn.Linear4bit(160, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 160), requires_grad=False, quant_type="nf4")._quantize("cpu")
    layer.eval()  # the repacked kernel is for inference only
    with pytest.raises(RuntimeError, match=r"shape '\[64, 2\]' is invalid for input of size 160"):
        layer(torch.randn(1, 160))
    assert cpu_4bit_problem(160, 64) == "in_features=160 is not a multiple of its block size 64"
    assert cpu_4bit_problem(64, 48) == "out_features=48 is not a multiple of 32"
    assert cpu_4bit_problem(128, 64) is None


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["cpu-without-avx512bf16", "cpu-with-avx512bf16"])
def test_unsupported_shapes_stay_unquantized_and_are_reported_on_both_kinds_of_cpu(tiny_llm_dir, tmp_path,
                                                                                   monkeypatch, cpu_kernel):
    if cpu_kernel and not machine_has_avx512_bf16():
        pytest.skip("forcing the AVX512-BF16 kernel on would execute instructions this CPU lacks")
    force_cpu_kernel(monkeypatch, cpu_kernel)
    out = tmp_path / "run"
    report = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=nf4", "backend=bitsandbytes")))
    left = report["quantization"]["left_unquantized"]
    assert sorted(left) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "in_features=160 is not a multiple of its block size 64" in left["model.layers.0.mlp.down_proj"]
    assert report["quantization"]["modules"] == 14 - 2 and report["reload_check"]["ok"]
    qcfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert qcfg["llm_int8_skip_modules"] == ["lm_head", *sorted(left)]
    assert "left unquantized: `model.layers.1.mlp.down_proj`" in (out / "report.md").read_text()
    assert "model.layers.0.mlp.down_proj" in (out / "model" / "README.md").read_text()


def test_a_model_with_no_runnable_shape_is_refused_before_any_data_is_read(tiny_llm_dir, tmp_path):
    """Refused right after the model loads: the evaluation file (shorter than one window, an error of the data
    stage) is never reached, so no baseline evaluation is spent either."""
    short = tmp_path / "short.txt"
    short.write_text("too short for one window\n")
    out = tmp_path / "run"
    extra = ["scheme=nf4", "backend=bitsandbytes", "scheme.targets=[re:.*down_proj]",
             "evaluation=text", f"evaluation.files=[{short}]"]
    with pytest.raises(ConfigError, match=r"cannot run any of the 2 target Linear\(s\).*backend=cpu scheme=w4a16"):
        run(compose(tiny_overrides(tiny_llm_dir, out, *extra)))
    assert not (out / "model").exists()


def test_what_the_report_counts_is_what_bitsandbytes_quantized(tiny_llm_dir, tmp_path):
    """transformers converts every Linear not in `llm_int8_skip_modules`: regex ignores (and targets) are
    resolved to names, so the folder holds exactly the Linear4bit modules the report counts."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    ignore = "scheme.ignore=[lm_head,re:.*q_proj]"
    report = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=nf4", "backend=bitsandbytes", ignore)))
    q = report["quantization"]
    skip = json.loads((out / "model" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head",
                    "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    quantized = {n: m for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert q["modules"] == len(quantized) == 14 - 2 - 2
    assert not any("q_proj" in n or "down_proj" in n for n in quantized)
    assert q["quantized_weights"] == sum(m.in_features * m.out_features for m in quantized.values())
