"""Range clipping by output error: never worse than min-max on the inputs it saw, clips where outliers waste
levels, and keeps the ragged last group."""

import torch

from hfquant.quant import QuantArgs, compute_qparams, fake_quantize, min_max
from hfquant.quant.clipping import clip_by_output_error, group_slices, shrink_ratios

ARGS = QuantArgs(num_bits=4, strategy="group", group_size=32, full_range=True)


def fake_quant(w, args=ARGS):
    scale, zero_point = compute_qparams(*min_max(w, args), args)
    return fake_quantize(w, scale, zero_point, args)


def output_error(w_hat, w, x):
    return float(((w_hat - w) @ x.T).pow(2).sum())


def test_the_ratio_grid_starts_unclipped_and_ends_at_the_smallest():
    assert shrink_ratios(5, 0.5) == [1.0, 0.875, 0.75, 0.625, 0.5] and shrink_ratios(1, 0.5) == [1.0]
    assert group_slices(80, 32) == [slice(0, 32), slice(32, 64), slice(64, 80)]


def test_clipping_lowers_the_output_error_and_never_raises_a_groups():
    torch.manual_seed(0)
    w = torch.randn(24, 80)
    w[:, 5] *= 8  # an outlier column: min-max spends most levels of its groups on it
    x = torch.randn(256, 80)
    clipped, ratio = clip_by_output_error(w, x.T @ x, ARGS, fake_quant)
    assert ratio.shape == (24, 3) and float(ratio.min()) >= 0.5 and float(ratio.max()) <= 1.0
    assert (ratio < 1).any()  # some ranges were clipped
    before, after = fake_quant(w) - w, fake_quant(clipped) - w
    for s in group_slices(80, 32):  # per (row, group) on these inputs: never worse (ratio 1.0 is a candidate)
        gram = x[:, s].T @ x[:, s]
        err_before = ((before[:, s] @ gram) * before[:, s]).sum(1)
        err_after = ((after[:, s] @ gram) * after[:, s]).sum(1)
        assert bool((err_after <= err_before * (1 + 1e-5) + 1e-6).all())
    assert output_error(fake_quant(clipped), w, x) < output_error(fake_quant(w), w, x)


def test_unclipped_groups_keep_their_weights_exactly():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    zero_inputs = torch.zeros(64, 64)  # no input reaches any weight: every error is 0, ratio 1.0 wins the ties
    clipped, ratio = clip_by_output_error(w, zero_inputs, ARGS, fake_quant)
    assert torch.equal(clipped, w) and bool((ratio == 1).all())
