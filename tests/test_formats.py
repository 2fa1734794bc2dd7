"""hfquant's storage format: QuantLinear equals the reference math; config versioning."""

import pytest
import torch

from hfquant.formats import HfQuantConfig, QuantLinear
from hfquant.quant import QuantArgs, compute_qparams, fake_quantize, min_max


@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=8, strategy="channel"),
    QuantArgs(num_bits=4, strategy="group", group_size=16, symmetric=False),
    QuantArgs(num_bits=2, strategy="group", group_size=8),
    QuantArgs(num_bits=8, strategy="tensor"),
], ids=["int8-channel", "int4-group-asym", "int2-group", "int8-tensor"])
def test_quant_linear_matches_fake_quantized_linear(args):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 6)  # 40 columns: ragged last group for group_size 16
    scale, zp = compute_qparams(*min_max(lin.weight, args), args)
    q = QuantLinear.from_linear(lin, args, scale, zp)
    x = torch.randn(3, 40)
    ref = torch.nn.functional.linear(x, fake_quantize(lin.weight.detach(), scale, zp, args), lin.bias)
    assert torch.allclose(q(x), ref, atol=1e-6)
    assert q.weight_packed.shape == (6, -(-40 * args.num_bits // 8))
    assert set(q.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point", "bias"}


def test_dynamic_activation_quantization_changes_outputs_slightly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8, bias=False)
    w_args = QuantArgs(num_bits=8, strategy="channel")
    a_args = QuantArgs(num_bits=8, strategy="token", dynamic=True)
    s, z = compute_qparams(*min_max(lin.weight, w_args), w_args)
    q_w = QuantLinear.from_linear(lin, w_args, s, z)
    q_wa = QuantLinear.from_linear(lin, w_args, s, z, input_args=a_args)
    x = torch.randn(4, 32)
    diff = (q_w(x) - q_wa(x)).abs().max()
    assert 0 < diff < 0.05


def test_newer_format_version_is_refused_with_advice():
    with pytest.raises(ValueError, match="upgrade hfquant"):
        HfQuantConfig(format_version=99)
    cfg = HfQuantConfig(scheme="w8a16", modules={"a": {"weights": QuantArgs().to_dict()}})
    assert cfg.to_dict()["quant_method"] == "hfquant" and cfg.to_dict()["format_version"] == 2


@pytest.mark.parametrize("fmt, extra, message", [
    ("compressed-tensors", ["scheme=w8a8-static"], r"cannot store scheme 'w8a8-static'.*quantize each token at run time"),
    ("compressed-tensors", ["scheme=w4a16-asym", "scheme.weights.float_zero_point=true"], r"zero points are integers"),
    ("compressed-tensors", ["scheme=w4a16", "resume=true"], r"resume=true reuses hfquant-format folders"),
    ("compressed-tensors", ["scheme=nf4"], r"cannot store scheme 'nf4'"),
    ("gguf", ["scheme=w4a16-asym", "scheme.weights.float_zero_point=true"], r"two roundings do not agree"),
    ("gguf", ["scheme=w8a16", "scheme.weights.symmetric=false"], r"asymmetric codes are written as Q4_1"),
    ("gguf", ["scheme=w4a16", "scheme.weights.group_size=48"], r"multiple of ggml's 32-element blocks"),
    ("gguf", ["scheme=w8a8"], r"llama.cpp quantizes activations itself"),
])
def test_what_an_export_format_cannot_store_is_a_config_error(fmt, extra, message):
    from hfquant.config import ConfigError, validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=message):
        validate(compose(["output_dir=/tmp/x", f"format={fmt}", *extra]))
