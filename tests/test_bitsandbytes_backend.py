"""The `bitsandbytes` backend: transformers' native format, reloadable without hfquant; CUDA tests skip cleanly."""

import json
import subprocess
import sys

import pytest
import torch

import hfquant
from hfquant.config import ConfigError, validate
from hfquant.pipeline.run import run
from tests.conftest import compose, tiny_overrides

RELOAD_WITHOUT_HFQUANT = """
import sys, torch
sys.modules["hfquant"] = None  # any attempt to import hfquant now fails
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map={"": "cpu"})
with torch.no_grad():
    torch.save(model(torch.arange(1, 40)[None]).logits, sys.argv[2])
print(type(model.model.layers[0].mlp.up_proj).__module__)
"""


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "llm-int8"])
def test_bitsandbytes_folder_reloads_with_plain_transformers(tiny_llm_dir, tmp_path, scheme):
    out = tmp_path / "run"
    report = run(compose(tiny_overrides(tiny_llm_dir, out, f"scheme={scheme}", "backend=bitsandbytes")))
    assert report["reload_check"]["max_abs_logit_difference"] == 0.0
    assert "own statistics" in report["calibration"]["status"]
    qcfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes"
    assert qcfg["bnb_4bit_compute_dtype"] == "float32"  # "auto" = the float32 model's own dtype
    # 4-bit: the fixture's down_proj (in_features=160) is a shape bitsandbytes' CPU kernel cannot run (see
    # tests/test_bitsandbytes_cpu_limits.py), so it stays unquantized on every CPU.
    cpu_skips = [] if scheme == "llm-int8" else ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert qcfg["load_in_4bit"] is (scheme != "llm-int8") and qcfg["llm_int8_skip_modules"] == ["lm_head", *cpu_skips]
    assert sorted(report["quantization"].get("left_unquantized", {})) == cpu_skips
    logits_path = tmp_path / "logits.pt"
    result = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_HFQUANT, str(out / "model"), str(logits_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("bitsandbytes")
    with torch.no_grad():
        here = hfquant.load_quantized(str(out / "model"), device_map={"": "cpu"})(torch.arange(1, 40)[None]).logits
    assert torch.equal(torch.load(logits_path), here)
    assert report["quantized"]["size"]["bytes_on_disk"] < 0.6 * report["baseline"]["size"]["bytes"]


def test_auto_picks_bitsandbytes_for_its_formats_and_says_why(tiny_llm_dir, tmp_path):
    report = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "r", "scheme=nf4")))
    assert report["run"]["backend"] == "bitsandbytes"
    assert "cpu: scheme format 'bitsandbytes' is not integer codes" in report["run"]["backend_reason"]


@pytest.mark.parametrize("overrides, message", [
    (["scheme=w8a8-static", "backend=bitsandbytes"], r"bitsandbytes cannot run scheme 'w8a8-static'.*scheme=llm-int8, nf4 or fp4.*Backends that can: fake"),
    (["scheme=nf4", "backend=cpu"], r"backend=cpu cannot run scheme 'nf4'.*Backends that can: bitsandbytes"),
    (["scheme=nf4", "backend=bitsandbytes", "scheme.options.bnb_4bit_compute_dtype=fp16"],
     r"bnb_4bit_compute_dtype must be auto, float32, float16, bfloat16; got 'fp16'"),
])
def test_impossible_combinations_fail_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["output_dir=/tmp/x", *overrides]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["nf4", "llm-int8"])
def test_bitsandbytes_on_cuda(tiny_llm_dir, tmp_path, scheme):
    out = tmp_path / "cuda"
    report = run(compose(tiny_overrides(tiny_llm_dir, out, f"scheme={scheme}", "backend=bitsandbytes", "device=cuda")))
    assert report["reload_check"]["max_abs_logit_difference"] <= 1e-4
    model = hfquant.load_quantized(str(out / "model"), device_map={"": "cuda"})
    assert next(model.parameters()).is_cuda


def test_a_bfloat16_model_stays_bfloat16(tiny_llm_dir, tmp_path):
    """4-bit matmuls compute in the model's own dtype and its unquantized parts keep it (a bfloat16 model on CUDA
    must not come back float32); the float32 CPU default is unchanged by the same rule."""
    out = tmp_path / "bf16"
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=nf4", "backend=bitsandbytes", "model.dtype=bfloat16")))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    model = hfquant.load_quantized(str(out / "model"), device_map={"": "cpu"})
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
