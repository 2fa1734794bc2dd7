"""Built-in scheme presets and targeting."""

import pytest
import torch

from hfquant import QuantArgs, QuantScheme, SchemeError, get_scheme


def test_presets_have_the_names_people_know():
    s = get_scheme("w8a16")
    assert s.weights == QuantArgs(num_bits=8, symmetric=True, strategy="channel") and s.weight_only
    s = get_scheme("w4a16")
    assert (s.weights.num_bits, s.weights.strategy, s.weights.group_size, s.weights.symmetric) == (4, "group", 128, True)
    assert get_scheme("w4a16-asym").weights.symmetric is False
    s = get_scheme("w8a8")
    assert s.input_activations.dynamic and s.input_activations.strategy == "token" and not s.needs_calibration_data
    s = get_scheme("w8a8-static")
    assert s.input_activations.strategy == "tensor" and s.needs_calibration_data
    assert get_scheme("int8-tensor").weights.strategy == "tensor"


def test_targets_linear_and_ignores_lm_head():
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2), "lm_head": torch.nn.Linear(2, 2), "norm": torch.nn.LayerNorm(2)})
    s = get_scheme("w8a16")
    picked = [n for n, m in model.named_modules() if n and s.is_target(n, m)]
    assert picked == ["proj"]


def test_regex_targets_and_ignores():
    s = QuantScheme("x", weights=QuantArgs(), targets=("re:.*mlp\\..*",), ignore=("re:.*down_proj",))
    lin = torch.nn.Linear(1, 1)
    assert s.is_target("layers.0.mlp.up_proj", lin)
    assert not s.is_target("layers.0.mlp.down_proj", lin)
    assert not s.is_target("layers.0.self_attn.q_proj", lin)


def test_with_observer_replaces_static_observers_only():
    s = get_scheme("w8a8").with_observer("mse")
    assert s.weights.observer == "mse" and s.input_activations.observer == "minmax"
    s = get_scheme("w8a8-static").with_observer("percentile")
    assert s.input_activations.observer == "percentile"


def test_scheme_round_trips_through_dict():
    s = get_scheme("w4a16-asym")
    assert QuantScheme.from_dict(s.to_dict()) == s


def test_invalid_schemes_fail_at_construction():
    with pytest.raises(SchemeError, match="quantizes nothing"):
        QuantScheme("empty", weights=None)
    with pytest.raises(SchemeError, match="dynamic"):
        QuantScheme("dyn", weights=QuantArgs(strategy="token", dynamic=True))
    with pytest.raises(SchemeError, match="bad regex"):
        QuantScheme("re", weights=QuantArgs(), targets=("re:(",))
