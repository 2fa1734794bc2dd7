"""Golden values from the standard quantization tutorials, through the public API (codes exact, scales 1e-6)."""

import pytest
import torch

from hfquant.quant import QuantArgs, compute_qparams, dequantize, min_max, mse, quantize

TUTORIAL_3X3 = [[191.6, -13.5, 728.6], [92.14, 295.5, -184], [0, 684.6, 245.5]]
TWENTY = [127.48, -40.1, 0, 89.74, 124.38, -39.1, 126.48, 21.2, -35.99, 124.16, 5.92, 41.68, 23.6,
          -26.4, -21.51, -20.6, 94.49, 85.07, 70.11, 76.91]


def roundtrip(x, args):
    scale, zp = compute_qparams(*min_max(x, args), args)
    q = quantize(x, scale, zp, args)
    return scale, zp, q, dequantize(q, scale, zp, args, dtype=x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_asymmetric_signed_int8_3x3(dtype):
    x = torch.tensor(TUTORIAL_3X3, dtype=dtype)
    scale, zp, q, xh = roundtrip(x, QuantArgs(num_bits=8, symmetric=False))
    assert float(scale) == pytest.approx(3.578823433670343, rel=1e-6)
    assert int(zp) == -77
    assert q.tolist() == [[-23, -81, 127], [-51, 6, -128], [-77, 114, -8]]
    assert float(mse(x, xh)) == pytest.approx(1.5730, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twenty_values_unsigned_asymmetric_and_symmetric(dtype):
    x = torch.tensor(TWENTY, dtype=dtype)
    asym = QuantArgs(num_bits=8, symmetric=False, signed=False)
    scale, zp, q, xh_asym = roundtrip(x, asym)
    assert float(scale) == pytest.approx(0.6571764705882354, rel=1e-6)
    assert int(zp) == 61
    assert q.tolist() == [255, 0, 61, 198, 250, 2, 253, 93, 6, 250, 70, 124, 97, 21, 28, 30, 205, 190, 168, 178]

    sym = QuantArgs(num_bits=8, symmetric=True)
    scale, zp, q, xh_sym = roundtrip(x, sym)
    assert float(scale) == pytest.approx(1.003779527559055, rel=1e-6)
    assert int(zp) == 0
    assert q.tolist() == [127, -40, 0, 89, 124, -39, 126, 21, -36, 124, 6, 42, 24, -26, -21, -21, 94, 85, 70, 77]
    assert float(mse(x, xh_asym)) < float(mse(x, xh_sym))


def test_symmetric_int8_small_vector_rounds_half_to_even():
    x = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0])
    _, _, q, _ = roundtrip(x, QuantArgs(num_bits=8, symmetric=True))
    assert q.tolist() == [-127, -64, 0, 64, 127]


def test_per_channel_beats_per_tensor_and_stays_in_range():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    for symmetric in (True, False):
        tensor_args = QuantArgs(num_bits=8, symmetric=symmetric, strategy="tensor")
        chan_args = QuantArgs(num_bits=8, symmetric=symmetric, strategy="channel")
        *_, q_t, xh_t = roundtrip(w, tensor_args)
        scale, _, q_c, xh_c = roundtrip(w, chan_args)
        assert scale.shape == (2, 1)
        for q in (q_t, q_c):
            assert int(q.min()) >= -128 and int(q.max()) <= 127
        assert float(mse(w, xh_c)) <= float(mse(w, xh_t))
