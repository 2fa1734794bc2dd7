"""Weights are quantized a few rows at a time; the codes must be exactly those of one whole-tensor pass."""

import pytest
import torch

from hfquant.quant import QuantArgs, compute_qparams, dequantize, min_max, quantize, quantize_with_error
import hfquant.quant.primitives as primitives
from hfquant.quant.primitives import CHUNK_ELEMENTS


@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=4, strategy="group", group_size=128, symmetric=True),
    QuantArgs(num_bits=4, strategy="group", group_size=128, symmetric=False),
    QuantArgs(num_bits=4, strategy="group", group_size=64, symmetric=True),
    QuantArgs(num_bits=8, strategy="channel", symmetric=True),
    QuantArgs(num_bits=8, strategy="tensor", symmetric=False),
], ids=["g128-sym", "g128-asym", "g64-ragged", "channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunks_equal_one_pass(args, dtype, monkeypatch):
    cols = 600 if args.group_size == 64 else 512  # 600 over groups of 64 leaves a ragged last group
    rows = CHUNK_ELEMENTS // cols * 3 + 7  # several chunks and a short last one
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    scale, zp = compute_qparams(*min_max(x, args), args)
    with monkeypatch.context() as one_pass:  # the same functions, no chunking
        one_pass.setattr(primitives, "CHUNK_ELEMENTS", 1 << 62)
        whole = quantize(x, scale, zp, args)
        ref = dequantize(whole, scale, zp, args)
    assert torch.equal(quantize(x, scale, zp, args), whole)
    codes, err, energy = quantize_with_error(x, scale, zp, args)
    assert torch.equal(codes, whole)
    xf = x.float()
    assert torch.equal(dequantize(whole, scale, zp, args), ref)
    assert err == pytest.approx(float((ref - xf).pow(2).sum()), rel=1e-4)
    assert energy == pytest.approx(float(xf.pow(2).sum()), rel=1e-4)
