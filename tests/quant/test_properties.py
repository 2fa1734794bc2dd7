"""Property tests: codes in range, bounded error, exact zero, per-group == per-tensor applied group by group."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hfquant.quant import QuantArgs, compute_qparams, dequantize, expand_qparam, fake_quantize, min_max, quantize

values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def matrices(draw, max_rows=4, max_cols=40):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    flat = draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(flat, dtype=torch.float32).reshape(rows, cols)


@st.composite
def quant_args(draw):
    strategy = draw(st.sampled_from(["tensor", "channel", "group"]))
    return QuantArgs(
        num_bits=draw(st.integers(2, 8)),
        symmetric=draw(st.booleans()),
        signed=draw(st.booleans()),
        strategy=strategy,
        group_size=draw(st.integers(1, 16)) if strategy == "group" else None,
    )


@settings(max_examples=200, deadline=None)
@given(matrices(), quant_args())
@example(torch.tensor([[6.446e-44]]), QuantArgs(num_bits=5, symmetric=False, signed=False, strategy="tensor"))  # subnormal range
def test_codes_in_range_error_bounded_zero_exact(x, args):
    scale, zp = compute_qparams(*min_max(x, args), args)
    q = quantize(x, scale, zp, args)
    assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    xh = dequantize(q, scale, zp, args)
    s = expand_qparam(scale, x, args).expand_as(x)
    if not args.symmetric:
        # Inside the observed range every value is within half a step (float32 slack of a few ulps).
        assert bool(((x - xh).abs() <= s / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all())
    zero = torch.zeros_like(x)
    assert bool((fake_quantize(zero, scale, zp, args) == 0).all())


@settings(max_examples=100, deadline=None)
@given(matrices(max_cols=30), st.integers(1, 8), st.integers(2, 8), st.booleans())
def test_per_group_equals_per_tensor_group_by_group(x, group_size, bits, symmetric):
    g_args = QuantArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=group_size)
    t_args = QuantArgs(num_bits=bits, symmetric=symmetric, strategy="tensor")
    scale, zp = compute_qparams(*min_max(x, g_args), g_args)
    grouped = quantize(x, scale, zp, g_args)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], group_size):
            part = x[r : r + 1, start : start + group_size]
            s, z = compute_qparams(*min_max(part, t_args), t_args)
            assert torch.equal(grouped[r : r + 1, start : start + group_size], quantize(part, s, z, t_args))


@settings(max_examples=100, deadline=None)
@given(matrices(), st.integers(2, 8))
def test_symmetric_error_bounded_by_half_step(x, bits):
    args = QuantArgs(num_bits=bits, symmetric=True, strategy="channel")
    scale, zp = compute_qparams(*min_max(x, args), args)
    xh = fake_quantize(x, scale, zp, args)
    # Symmetric clips at most the single most-negative code's half step.
    assert bool(((x - xh).abs() <= scale * (0.5 + 1e-5) + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x = torch.linspace(-3, 5, 50).reshape(5, 10).to(dtype)
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=4)
    scale, zp = compute_qparams(*min_max(x, args), args)
    xh = fake_quantize(x, scale, zp, args)
    assert xh.dtype == dtype and scale.dtype == torch.float32
    assert float((x.float() - xh.float()).abs().max()) <= float(scale.max()) * 0.5 + 0.05


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_with_a_clear_error(bad):
    x = torch.tensor([1.0, bad, 2.0])
    args = QuantArgs()
    with pytest.raises(ValueError, match="NaN or Inf"):
        min_max(x, args)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, torch.tensor(0.1), torch.tensor(0), args)
    with pytest.raises(ValueError, match="NaN or Inf"):
        compute_qparams(torch.tensor(bad), torch.tensor(1.0), args)
