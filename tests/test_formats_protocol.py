"""Formats as plugins: `compress` is a pure function of one module's tensors that writes exactly what the
format's consumer reads; `format=` is checked against the scheme and the backend at config time."""

import tempfile

import pytest
import torch

from hfquant import Format
from hfquant.config import ConfigError, validate
from hfquant.plan import ModulePlan
from hfquant.plugins import registries
from hfquant.quant import compute_qparams, min_max, quantize
from tests.conftest import compose, tiny_overrides


def test_builtin_formats_satisfy_the_protocol():
    for name in ("hfquant", "bitsandbytes"):
        cls = registries().formats.get(name)
        assert isinstance(cls(registries().schemes.get("w4a16" if name == "hfquant" else "nf4")), Format)


def test_hfquant_compress_stores_the_given_codes():
    scheme = registries().schemes.get("w4a16")
    args = scheme.weights.replace(group_size=32)
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 80), torch.randn(8)
    scale, zp = compute_qparams(*min_max(weight, args), args)
    codes = quantize(weight, scale, zp, args)
    codes[0, 0] = -codes[0, 0] - 1  # not what rounding gives: compress must keep the algorithm's codes
    mp = ModulePlan("m", args, (scale, zp), weight_codes=codes)
    fmt = registries().formats.get("hfquant")(scheme)
    out = fmt.compress(mp, {"weight": weight, "bias": bias})
    assert list(out) == fmt.parameter_names(mp, has_bias=True)
    from hfquant.quant import unpack

    assert torch.equal(unpack(out["weight_packed"], args, 80), codes)
    assert torch.equal(out["bias"], bias)


@pytest.mark.parametrize("scheme_name", ["nf4", "fp4", "llm-int8"])
def test_bitsandbytes_compress_equals_what_transformers_loader_writes(scheme_name):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hfquant_builtins.backends.bitsandbytes import bnb_config

    scheme = registries().schemes.get(scheme_name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(scheme, ["lm_head"]),
                                                      device_map={"": "cpu"}, dtype=torch.float32)
    name = "model.layers.0.mlp.up_proj"
    theirs = {k[len(name) + 1:]: v for k, v in loaded.state_dict().items() if k.startswith(name + ".")}
    mp = ModulePlan(name, scheme.weights)
    fmt = registries().formats.get("bitsandbytes")(scheme)
    mine = fmt.compress(mp, {"weight": model.get_submodule(name).weight.detach()})
    assert sorted(mine) == sorted(k for k in theirs if k != "weight_format")
    for key, tensor in mine.items():
        assert torch.equal(tensor, theirs[key]), key


@pytest.mark.parametrize("extra,message", [
    (["format=bitsandbytes"], "format=bitsandbytes cannot store scheme 'w4a16'"),
    (["format=hfquant", "scheme=nf4"], "format=hfquant cannot store scheme 'nf4'"),
    (["format=bitsandbytes", "scheme=nf4", "backend=cpu"], "backend=cpu cannot run scheme .nf4. on cpu"),
])
def test_format_requests_are_checked_at_config_time(tiny_llm_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(tiny_overrides(tiny_llm_dir, tmp_path / "o", *extra)))


def test_format_auto_follows_the_backend(tiny_llm_dir, tmp_path):
    assert validate(compose(tiny_overrides(tiny_llm_dir, tmp_path / "o"))).format == "auto"
    assert validate(compose(tiny_overrides(tiny_llm_dir, tmp_path / "o", "format=bitsandbytes", "scheme=nf4"))).format == "bitsandbytes"
