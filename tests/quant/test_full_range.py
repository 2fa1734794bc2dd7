"""Full-range symmetric int4 (llama.cpp Q4_0's rule): the largest-magnitude value of each slice maps to qmin
exactly, sign included, so all 16 levels are used; the restricted rule keeps |max| → qmax (15 levels)."""

import pytest
import torch

from hfquant.quant import QuantArgs, QuantArgsError, compute_qparams, dequantize, min_max, quantize


def test_largest_magnitude_maps_to_qmin_with_its_sign():
    args = QuantArgs(num_bits=4, strategy="channel", full_range=True)
    x = torch.tensor([[0.5, -1.6, 0.2, 0.1], [0.3, 2.4, -0.8, -2.0]])
    scale, zp = compute_qparams(*min_max(x, args), args)
    assert scale[0, 0] == pytest.approx(-1.6 / -8) and scale[1, 0] == pytest.approx(2.4 / -8)  # negative for +max
    q = quantize(x, scale, zp, args)
    assert q[0, 1] == -8 and q[1, 1] == -8
    torch.testing.assert_close(dequantize(q, scale, zp, args)[:, 1], x[:, 1])


def test_uses_all_sixteen_levels_and_beats_the_restricted_rule_on_gaussian_groups():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    errors = {}
    for full in (False, True):
        args = QuantArgs(num_bits=4, strategy="group", group_size=128, full_range=full)
        scale, zp = compute_qparams(*min_max(w, args), args)
        q = quantize(w, scale, zp, args)
        errors[full] = float((dequantize(q, scale, zp, args) - w).pow(2).mean())
        levels = set(torch.unique(q).tolist())
        assert levels == set(range(-8, 8)) if full else levels <= set(range(-7, 8))
    assert errors[True] < 0.8 * errors[False]


def test_all_zero_slice_and_tiny_ranges_keep_a_usable_scale():
    args = QuantArgs(num_bits=4, strategy="channel", full_range=True)
    scale, _ = compute_qparams(torch.tensor([[0.0], [0.0]]), torch.tensor([[0.0], [1e-40]]), args)
    assert scale[0, 0] == 1 and scale[1, 0] < 0 and torch.isfinite(1 / scale).all()


def test_needs_symmetric_signed_and_is_written_only_when_set():
    with pytest.raises(QuantArgsError, match="full_range=True needs symmetric=True and signed=True"):
        QuantArgs(num_bits=4, symmetric=False, full_range=True)
    assert "full_range" not in QuantArgs(num_bits=4).to_dict()
    assert QuantArgs.from_dict(QuantArgs(num_bits=4, full_range=True).to_dict()).full_range
