"""Sequential (layer-by-layer) calibration gives the scales the whole-model path gives, finds the decoder
layers of the common layouts by structure, and names the model class when it cannot."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hfquant.pipeline.run import run
from hfquant.pipeline.sequential import decoder_layers
from hfquant.pipeline.streaming import StreamingError
from tests.conftest import compose


def test_layer_by_layer_scales_equal_whole_model_scales(tiny_llm_dir, tmp_path):
    common = ["model=hub", f"model.path={tiny_llm_dir}", "scheme=w8a8-static", "evaluation=none",
              "calibration.seq_len=64", "calibration.num_samples=4", "algorithm=rtn"]
    mem = run(compose([*common, f"output_dir={tmp_path / 'mem'}", "pipeline=in_memory"]))
    seq = run(compose([*common, f"output_dir={tmp_path / 'seq'}"]))  # auto
    assert seq["run"]["pipeline"] == "streaming" and "layer by layer" in seq["calibration"]["status"]
    assert seq["calibration"]["windows"] == mem["calibration"]["windows"]
    a = load_file(str(tmp_path / "mem" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "seq" / "model" / "model.safetensors"))
    scales = [k for k in a if k.endswith("input_scale")]
    assert len(scales) == 14
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "mem" / "model" / name).read_bytes() == (tmp_path / "seq" / "model" / name).read_bytes()


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family,expected", [("llama", "model.layers"), ("qwen2", "model.layers"),
                                             ("gemma", "model.layers"), ("gpt2", "transformer.h")])
def test_decoder_layers_are_found_by_structure(family, expected):
    from transformers import AutoConfig

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
    if family == "gpt2":
        small = dict(vocab_size=64, n_embd=32, n_layer=3, n_head=4)
    name, layers = decoder_layers(_meta_model(AutoConfig.for_model(family, **small)))
    assert name == expected and len(layers) == 3


def test_unknown_structure_is_refused_naming_the_class():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(StreamingError, match=r"decoder layers of Flat.*pipeline=in_memory"):
        decoder_layers(Flat())
