"""Float zero points (`QuantArgs.float_zero_point`): the grid's offset is a float16 value instead of an integer
code, codes are round(x/s + z), and what is stored is exactly what the codes were computed with."""

import pytest
import torch

from hfquant.formats import QuantLinear
from hfquant.quant import (QuantArgs, QuantArgsError, compute_qparams, dequantize, min_max, quantize,
                           quantize_with_error, stored_zero_point, zero_point_dtype)

FZ = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=64, float_zero_point=True)
INT = FZ.replace(float_zero_point=False)


def gaussian(rows=128, cols=576, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_needs_an_asymmetric_scheme_and_is_written_only_when_set():
    with pytest.raises(QuantArgsError, match="float_zero_point=True needs symmetric=False"):
        QuantArgs(num_bits=4, symmetric=True, float_zero_point=True)
    assert "float_zero_point" not in INT.to_dict()
    assert QuantArgs.from_dict(FZ.to_dict()) == FZ


def test_min_maps_to_qmin_and_the_zero_point_is_float16_exact():
    w = gaussian()
    scale, zp = compute_qparams(*min_max(w, FZ), FZ)
    assert zp.dtype == torch.float32 and torch.equal(zp, zp.half().float())
    assert float(zp.min()) >= FZ.qmin and float(zp.max()) <= FZ.qmax
    assert not torch.equal(zp, zp.round())  # genuinely fractional offsets
    q = quantize(w, scale, zp, FZ)
    lo = min_max(w, FZ)[0]
    # the group minimum lands on qmin up to the float16 rounding of z (a few thousandths of a step)
    torch.testing.assert_close((lo / scale + zp), torch.full_like(zp, FZ.qmin), atol=5e-3, rtol=0)
    assert int(q.min()) == FZ.qmin and int(q.max()) == FZ.qmax


def test_codes_are_round_of_x_over_s_plus_z_and_errors_agree():
    w = gaussian(cols=200)  # ragged last group
    scale, zp = compute_qparams(*min_max(w, FZ), FZ)
    q = quantize(w, scale, zp, FZ)
    s, z = (p.repeat_interleave(64, dim=1)[:, :200] for p in (scale, zp))
    expected = torch.round(w / s + z).clamp(FZ.qmin, FZ.qmax).to(torch.int8)
    assert torch.equal(q, expected)
    codes, err, energy = quantize_with_error(w, scale, zp, FZ)
    assert torch.equal(codes, q)
    d = dequantize(q, scale, zp, FZ)
    assert err == pytest.approx(float((d - w).double().pow(2).sum()), rel=1e-5)
    assert float((d - w).abs().max()) <= 0.5 * float(scale.max()) * 1.01  # never clipped: the range is exact


def test_lower_error_than_integer_zero_points_on_gaussian_groups():
    w = gaussian()
    errors = {}
    for args in (INT, FZ):
        scale, zp = compute_qparams(*min_max(w, args), args)
        errors[args.float_zero_point] = quantize_with_error(w, scale, zp, args)[1]
    assert errors[True] < errors[False]


def test_stored_zero_point_clamps_and_rounds_to_float16():
    z = torch.tensor([-9.0, 0.123456, 6.99999, 20.0])
    out = stored_zero_point(z, QuantArgs(num_bits=4, symmetric=False, float_zero_point=True))
    assert out.tolist() == [-8.0, float(torch.tensor(0.123456).half()), 7.0, 7.0]
    unsigned = QuantArgs(num_bits=4, symmetric=False, signed=False, float_zero_point=True)
    assert stored_zero_point(torch.tensor([-1.0, 14.3]), unsigned).tolist() == [0.0, float(torch.tensor(14.3).half())]


def test_quant_linear_stores_float16_zero_points_and_dequantizes_the_same_values():
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 96)
    scale, zp = compute_qparams(*min_max(lin.weight, FZ), FZ)
    q = QuantLinear.from_linear(lin, FZ, scale, zp)
    assert zero_point_dtype(FZ) == torch.float16 and q.weight_zero_point.dtype == torch.float16
    assert torch.equal(q.weight_zero_point.float(), zp)
    expected = dequantize(quantize(lin.weight.detach(), scale, zp, FZ), scale, zp, FZ)
    assert torch.equal(q.dequantized_weight(), expected)
    again = QuantLinear(576, 96, True, FZ)
    again.load_state_dict(q.state_dict())
    x = torch.randn(3, 576)
    assert torch.equal(again(x), q(x))
