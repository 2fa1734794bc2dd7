"""`algorithm=auto`, the default: the recipe follows the scheme, backend, data and — after loading — the model."""

from __future__ import annotations

import logging

import pytest
import torch

from hfquant.config import ConfigError, validate
from hfquant.pipeline.run import run
from tests.conftest import compose, tiny_overrides


@pytest.mark.parametrize("extra, chosen, why", [
    ([], ["awq", "gptq"], "4-bit weights"),
    (["scheme=w4a16-asym"], ["awq", "gptq"], "4-bit weights"),
    (["scheme=w8a16"], ["rtn"], "8-bit weights"),
    (["scheme=w8a8"], ["smoothquant", "gptq"], "int8 activations"),
    (["scheme=w8a8-static"], ["rtn"], "8-bit weights"),
    (["scheme=nf4"], ["rtn"], "bitsandbytes backend computes its own codes"),
    (["scheme=nf4", "backend=bitsandbytes"], ["rtn"], "bitsandbytes backend computes its own codes"),
    (["calibration=none"], ["rtn"], "no calibration data"),
    (["calibration=none", "scheme=w4a16-asym", "scheme.weights.float_zero_point=true"], ["hqq"],
     "float zero points: HQQ's data-free zero-point optimisation"),
    (["scheme=w4a16-asym", "scheme.weights.float_zero_point=true"], ["awq", "gptq"], "4-bit weights"),
])
def test_auto_picks_the_recipe_for_the_scheme(tmp_path, extra, chosen, why):
    spec = validate(compose([f"output_dir={tmp_path / 'o'}", *extra]))
    assert list(spec.algorithms) == chosen and why in spec.algorithm_reason and spec.algorithm_auto


def test_plain_rtn_with_float_zero_points_is_warned_about_once(tiny_llm_dir, tmp_path, caplog):
    from hfquant.auto_algorithm import named_recipe_warning

    float_zero = ["scheme=w4a16-asym", "scheme.weights.float_zero_point=true"]
    spec = validate(compose([f"output_dir={tmp_path / 'o'}", "algorithm=rtn", *float_zero]))
    warning = named_recipe_warning(spec.scheme, spec.algorithms)
    assert "algorithm=rtn with float zero points" in warning and "algorithm=hqq" in warning and "1.500" in warning
    for quiet in (["algorithm=rtn", "scheme=w4a16-asym"], ["algorithm=hqq", *float_zero],
                  ["algorithm=[awq,gptq]", *float_zero], ["algorithm=rtn", "scheme=w8a16", "scheme.weights.symmetric=false",
                                                          "scheme.weights.float_zero_point=true"]):
        spec = validate(compose([f"output_dir={tmp_path / 'o'}", *quiet]))
        assert named_recipe_warning(spec.scheme, spec.algorithms) is None, quiet
    caplog.set_level(logging.WARNING, logger="hfquant")
    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "algorithm=rtn", *float_zero)))
    assert sum("algorithm=rtn with float zero points" in r.getMessage() for r in caplog.records) == 1


def test_named_algorithms_are_not_auto_and_auto_does_not_combine(tmp_path):
    spec = validate(compose([f"output_dir={tmp_path / 'o'}", "algorithm=gptq"]))
    assert list(spec.algorithms) == ["gptq"] and not spec.algorithm_auto
    with pytest.raises(ConfigError, match="algorithm=auto chooses the whole recipe; it cannot be combined with gptq"):
        validate(compose([f"output_dir={tmp_path / 'o'}", "algorithm=[auto,gptq]"]))
    with pytest.raises(ConfigError, match=r"algorithm=auto takes no options \(got \['grid'\]\)"):
        validate(compose([f"output_dir={tmp_path / 'o'}", "+algorithm.auto.grid=3"]))


@pytest.fixture()
def tiny_opt_dir(tmp_path, tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                             pad_token_id=1, bos_token_id=0, eos_token_id=1)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("pipeline", ["in_memory", "streaming"])
def test_auto_drops_awq_on_a_layout_it_cannot_fold_into_and_says_why(tiny_opt_dir, tmp_path, caplog, pipeline):
    """OPT's blocks (out_proj, fc1/fc2, post-hoc norms) are not a layout AWQ folds into: an explicit algorithm=awq
    is refused (see test_layerwise), the default keeps GPTQ and reports why."""
    caplog.set_level(logging.INFO, logger="hfquant")
    common = ["algorithm=auto", "scheme.weights.group_size=32", "calibration.generated=0", f"pipeline={pipeline}"]
    if pipeline == "streaming":
        overrides = ["model=hub", f"model.path={tiny_opt_dir}", f"output_dir={tmp_path / 'out'}", "evaluation=none",
                     "calibration.seq_len=64", "calibration.num_samples=4", *common]
    else:
        overrides = tiny_overrides(tiny_opt_dir, tmp_path / "out", *common)
    report = run(compose(overrides))
    assert report["run"]["pipeline"] == pipeline
    assert report["quantization"]["algorithms"] == ["gptq"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "algorithm=auto: awq dropped: awq cannot smooth model.decoder.layers.0 (OPTDecoderLayer)" in messages
    if pipeline == "in_memory":
        assert "awq dropped" in report["run"]["algorithm_reason"] and report["run"]["algorithms"] == ["gptq"]
        card = (tmp_path / "out" / "model" / "README.md").read_text()
        assert "chosen by algorithm=auto: " in card and "awq dropped" in card
    else:
        assert "awq dropped" in report["quantization"]["algorithms_dropped"][0]
        assert report["run"]["algorithms"] == ["gptq"] and "awq dropped" in report["run"]["algorithm_reason"]
        assert "algorithm gptq learned" in report["calibration"]["status"] and "{" not in report["calibration"]["status"]


def test_every_decoder_layer_is_checked_not_only_the_first():
    """A model may switch layouts (dense first layers, then MoE): the refusal names the layer that differs."""
    from hfquant.algorithm import AlgorithmError
    from hfquant.pipeline.layerwise import check_layers, make_chain
    from tests.algorithms.test_smoothing import two_layer_llama

    model = two_layer_llama()
    model.model.layers[1].mlp = torch.nn.Identity()  # stands in for a block AWQ cannot fold into
    with pytest.raises(AlgorithmError, match=r"awq cannot smooth model\.layers\.1 "):
        check_layers(make_chain({"awq": {}, "gptq": {}}), model)
    chain = make_chain({"awq": {}, "gptq": {}})
    dropped = check_layers(chain, model, drop_unsupported=True)
    assert chain.names == ["gptq"] and len(dropped) == 1 and "model.layers.1 " in dropped[0]


def test_algorithm_options_reach_the_report_and_card(tiny_llm_dir, tmp_path):
    out = tmp_path / "o"
    report = run(compose(tiny_overrides(tiny_llm_dir, out, "algorithm=gptq", "algorithm.gptq.dampening=0.05",
                                        "scheme.weights.group_size=32", "calibration.generated=0")))
    assert report["run"]["algorithm_options"] == {"gptq": {"dampening": 0.05}}  # only what differs from the defaults
    assert "`gptq` (dampening=0.05)" in (out / "model" / "README.md").read_text()
    plain = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "p", "algorithm=gptq", "scheme.weights.group_size=32",
                                       "calibration.generated=0")))
    assert "algorithm_options" not in plain["run"]  # every option at its default: nothing to name
