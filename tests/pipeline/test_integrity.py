"""NaN/Inf are found where they enter, and named: in a checkpoint's weights on load (both pipelines), in a
quantized weight while observing it, and in the unquantized model's own output on the evaluation text."""

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfquant.pipeline.calibrate import build_plan
from hfquant.pipeline.layerwise import make_chain, quantize_in_memory
from hfquant.pipeline.integrity import NonFiniteError
from hfquant.pipeline.run import run
from hfquant.plugins import registries
from tests.conftest import compose, tiny_overrides


def edited_copy(tiny_llm_dir, tmp_path, edit) -> str:
    """The tiny model with `edit(tensors)` applied to its safetensors file."""
    folder = tmp_path / "model-copy"
    shutil.copytree(tiny_llm_dir, folder)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(folder)


def poison(name, index, value):
    def edit(tensors):
        tensors[name].view(-1)[index] = value
    return edit


def streaming(model_dir, out, *extra):
    return ["model=hub", f"model.path={model_dir}", f"output_dir={out}", "calibration=none", "algorithm=rtn", "evaluation=none", *extra]


def test_nan_in_an_unquantized_weight_is_named_on_load(tiny_llm_dir, tmp_path, monkeypatch):
    model = edited_copy(tiny_llm_dir, tmp_path, poison("model.norm.weight", 3, float("nan")))
    monkeypatch.setattr("hfquant.pipeline.run.evaluate_baseline", lambda *a, **k: pytest.fail("evaluated a broken model"))
    with pytest.raises(NonFiniteError, match=r"has NaN or Inf in 1 tensor\(s\): model.norm.weight \(1 of 64 values\)"):
        run(compose(tiny_overrides(model, tmp_path / "out", "scheme=w8a16")))
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"])
def test_streaming_names_the_tensor_as_it_is_read(tiny_llm_dir, tmp_path, name):
    model = edited_copy(tiny_llm_dir, tmp_path, poison(name, 7, float("inf")))
    with pytest.raises(NonFiniteError, match=rf"checkpoint .* has NaN or Inf in 1 tensor\(s\): {name} \(1 of"):
        run(compose(streaming(model, tmp_path / "out", "scheme=w8a16", "pipeline=streaming")))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".hydra")) == []


def test_sequential_calibration_names_the_tensor_before_running_the_layer(tiny_llm_dir, tmp_path):
    name = "model.layers.0.input_layernorm.weight"
    model = edited_copy(tiny_llm_dir, tmp_path, poison(name, 2, float("nan")))
    overrides = ["model=hub", f"model.path={model}", f"output_dir={tmp_path / 'out'}", "scheme=w8a8-static",
                 "evaluation=none", "calibration.seq_len=64", "calibration.num_samples=2", "pipeline=streaming",
                 "algorithm=rtn"]
    with pytest.raises(NonFiniteError, match=rf"checkpoint .*model-copy' \(model.safetensors\) has NaN or Inf in "
                                             rf"1 tensor\(s\): {name} \(1 of 64 values\)"):
        run(compose(overrides))
    assert not (tmp_path / "out" / "model").exists()


def test_nan_in_a_quantized_weight_is_named_when_observed(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[2, 5] = float("nan")
    scheme = registries().schemes.get("w8a16")
    plan = build_plan(model, scheme, "minmax", registries().observers.get("minmax"), {})
    minmax = registries().observers.get("minmax")
    with pytest.raises(NonFiniteError, match=r"model.layers.0.mlp.up_proj.weight: observed tensor contains NaN or Inf \(1 of"):
        quantize_in_memory(model, plan, make_chain({"rtn": {}}), lambda args: minmax(args))


def test_nan_in_the_baseline_logits_stops_the_run_before_quantizing(tiny_llm_dir, tmp_path, monkeypatch):
    # Finite weights whose forward overflows: gate and up projections at 1e20 multiply to Inf in float32.
    def overflow(tensors):
        for part in ("gate_proj", "up_proj"):
            tensors[f"model.layers.0.mlp.{part}.weight"][:, :] = 1e20

    model = edited_copy(tiny_llm_dir, tmp_path, overflow)
    monkeypatch.setattr("hfquant.pipeline.run.build_plan", lambda *a, **k: pytest.fail("quantized a broken model"))
    with pytest.raises(NonFiniteError, match=r"the unquantized model's perplexity \(evaluator 'perplexity'\) is nan on the evaluation text"):
        run(compose(tiny_overrides(model, tmp_path / "out", "scheme=w8a16")))


def checkpoint_copy(tiny_llm_dir, tmp_path) -> str:
    folder = tmp_path / "model-copy"
    shutil.copytree(tiny_llm_dir, folder)
    return str(folder)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("damage, message", [
    ("truncate", r"input checkpoint file '.*model-copy/model.safetensors' is truncated: \d+ bytes, its header describes \d+"),
    ("header", r"input checkpoint file '.*model-copy/model.safetensors' is corrupt \(.*\); re-download it"),
    ("config", r"input checkpoint tensor 'model.layers.0.mlp.down_proj.weight' in 'model.safetensors' has shape "
               r"\[64, 160\], but '.*model-copy/config.json' makes it \[64, 128\]"),
])
def test_a_broken_input_checkpoint_is_named_before_anything_is_written(tiny_llm_dir, tmp_path, monkeypatch, stream,
                                                                       damage, message):
    import json
    import os

    from hfquant.pipeline.integrity import CheckpointError

    model = checkpoint_copy(tiny_llm_dir, tmp_path)
    weights = os.path.join(model, "model.safetensors")
    if damage == "truncate":
        os.truncate(weights, os.path.getsize(weights) - 1000)
    elif damage == "header":
        with open(weights, "r+b") as f:
            f.seek(8)
            f.write(b"garbage!")
    else:
        cfg = json.loads(open(os.path.join(model, "config.json")).read())
        cfg["intermediate_size"] = 128
        open(os.path.join(model, "config.json"), "w").write(json.dumps(cfg))
    monkeypatch.setattr("hfquant.pipeline.run.claim_output", lambda *a: pytest.fail("claimed the output first"))
    overrides = streaming(model, tmp_path / "out", "scheme=w8a16") if stream else \
        tiny_overrides(model, tmp_path / "out", "scheme=w8a16")
    with pytest.raises(CheckpointError, match=message):
        run(compose(overrides))
    assert not (tmp_path / "out").exists()


def hub_cache_copy(tiny_llm_dir, cache, repo_id="hfquant-tests/tiny") -> str:
    """The tiny model as the Hub cache lays out a downloaded repository (refs/main → snapshots/<commit>/)."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(tiny_llm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(repo / "snapshots" / commit)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"hfquant: error: input checkpoint file '.*snapshots/0{40}/model.safetensors' is truncated: "),
    ("config", r"hfquant: error: input checkpoint tensor 'model.layers.0.mlp.down_proj.weight' in 'model.safetensors' "
               r"has shape \[64, 160\], but '.*snapshots/0{40}/config.json' makes it \[64, 128\]"),
])
def test_a_broken_hub_download_is_named_not_a_raw_loader_error(tiny_llm_dir, tmp_path, damage, message):
    """In memory, a Hub id is loaded by transformers from the cache (not pre-checked as a local folder): its
    raw SafetensorError / size-mismatch RuntimeError becomes the same named error."""
    import json
    import os
    import subprocess
    import sys

    snapshot = hub_cache_copy(tiny_llm_dir, tmp_path / "cache")
    if damage == "truncate":
        weights = os.path.join(snapshot, "model.safetensors")
        os.truncate(weights, os.path.getsize(weights) - 1000)
    else:
        cfg = json.loads(open(os.path.join(snapshot, "config.json")).read())
        open(os.path.join(snapshot, "config.json"), "w").write(json.dumps(dict(cfg, intermediate_size=128)))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "hfquant", *tiny_overrides("hfquant-tests/tiny", out, "scheme=w8a16", "pipeline=in_memory")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (out / "model").exists()


def test_a_nan_baseline_is_never_cached(tiny_llm_dir, tmp_path, monkeypatch):
    import os

    from hfquant.pipeline.evaluate import cache_dir

    def overflow(tensors):
        for part in ("gate_proj", "up_proj"):
            tensors[f"model.layers.0.mlp.{part}.weight"][:, :] = 1e20

    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    model = edited_copy(tiny_llm_dir, tmp_path, overflow)
    with pytest.raises(NonFiniteError, match="the unquantized model's perplexity"):
        run(compose(tiny_overrides(model, tmp_path / "out", "scheme=w8a16")))
    assert not os.path.isdir(cache_dir()) or os.listdir(cache_dir()) == []
