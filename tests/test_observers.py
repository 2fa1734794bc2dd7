"""Built-in observers: weights (tensor / channel / group) and streaming activations."""

import pytest
import torch

from hfquant import QuantArgs, get_observer
from hfquant.quant import compute_qparams, fake_quantize, min_max, mse

WEIGHT_ARGS = [
    QuantArgs(num_bits=8, strategy="tensor"),
    QuantArgs(num_bits=8, strategy="channel"),
    QuantArgs(num_bits=4, strategy="group", group_size=16, symmetric=False),
]


@pytest.mark.parametrize("name", ["minmax", "moving-average", "percentile", "mse"])
@pytest.mark.parametrize("args", WEIGHT_ARGS, ids=["tensor", "channel", "group"])
def test_every_observer_gives_qparams_shaped_for_the_strategy(name, args):
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    obs = get_observer(name)(args.replace(observer=name))
    obs.observe(w)
    scale, zp = obs.qparams()
    ref_scale, ref_zp = compute_qparams(*min_max(w, args), args)
    assert scale.shape == ref_scale.shape and zp.shape == ref_zp.shape
    assert bool((scale > 0).all())


def test_minmax_on_one_weight_equals_min_max():
    w = torch.randn(5, 9)
    args = QuantArgs(strategy="channel")
    obs = get_observer("minmax")(args)
    obs.observe(w)
    s, z = obs.qparams()
    rs, rz = compute_qparams(*min_max(w, args), args)
    assert torch.equal(s, rs) and torch.equal(z, rz)


def test_minmax_streams_running_extremes():
    obs = get_observer("minmax")(QuantArgs(symmetric=False))
    for batch in (torch.tensor([[-1.0, 2.0]]), torch.tensor([[0.5, 7.0]]), torch.tensor([[-3.0, 1.0]])):
        obs.observe(batch)
    assert float(obs.min_vals) == -3.0 and float(obs.max_vals) == 7.0


def test_moving_average_damps_a_spike():
    args = QuantArgs(symmetric=False)
    ma = get_observer("moving-average")(args, momentum=0.9)
    mm = get_observer("minmax")(args)
    for i in range(20):
        batch = torch.tensor([[-1.0, 1.0]]) * (50.0 if i == 10 else 1.0)
        ma.observe(batch)
        mm.observe(batch)
    assert float(mm.max_vals) == 50.0
    assert 1.0 < float(ma.max_vals) < 10.0


def test_moving_average_rejects_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        get_observer("moving-average")(QuantArgs(), momentum=1.5)


def test_percentile_clips_outliers_and_reduces_error_on_the_bulk():
    torch.manual_seed(0)
    x = torch.randn(1, 10000)
    x[0, 0] = 60.0  # one outlier
    args = QuantArgs(num_bits=8, symmetric=True)
    pct = get_observer("percentile")(args, lower=0.1, upper=99.9)
    pct.observe(x)
    assert float(pct.max_vals) < 5.0
    s_p, z_p = pct.qparams()
    s_m, z_m = compute_qparams(*min_max(x, args), args)
    bulk = x[:, 1:]
    assert float(mse(bulk, fake_quantize(bulk, s_p, z_p, args))) < float(mse(bulk, fake_quantize(bulk, s_m, z_m, args)))


def test_percentile_validates_its_bounds():
    with pytest.raises(ValueError, match="lower < upper"):
        get_observer("percentile")(QuantArgs(), lower=99.0, upper=1.0)


@pytest.mark.parametrize("args", WEIGHT_ARGS, ids=["tensor", "channel", "group"])
def test_mse_never_has_more_error_than_minmax(args):
    torch.manual_seed(1)
    w = torch.randn(8, 64) * torch.linspace(0.1, 3, 64)
    w[0, 3] = 12.0
    m = get_observer("mse")(args)
    m.observe(w)
    s, z = m.qparams()
    rs, rz = compute_qparams(*min_max(w, args), args)
    err_mse = float(mse(w, fake_quantize(w, s, z, args)))
    err_mm = float(mse(w, fake_quantize(w, rs, rz, args)))
    assert err_mse <= err_mm * 1.0001


@pytest.mark.parametrize("name", ["minmax", "moving-average", "percentile", "mse"])
def test_activation_streaming_keeps_memory_bounded(name):
    """Statistics stay the size of the qparams, however many batches stream through."""
    obs = get_observer(name)(QuantArgs(num_bits=8, symmetric=False, strategy="tensor"))
    for _ in range(10):
        obs.observe(torch.randn(2, 16, 32))
    assert obs.min_vals.numel() == 1 and obs.count == 10
    scale, zp = obs.qparams()
    assert scale.numel() == 1


def test_qparams_before_observe_is_a_clear_error():
    with pytest.raises(RuntimeError, match="nothing was observed"):
        get_observer("minmax")(QuantArgs()).qparams()


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="allowed: lower, upper"):
        get_observer("percentile")(QuantArgs(), upper_pct=99)


def test_observing_nan_is_refused():
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_observer("minmax")(QuantArgs()).observe(torch.tensor([1.0, float("nan")]))
