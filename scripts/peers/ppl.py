"""The perplexity protocol shared by hfquant's rows and every peer's (imports torch only, never hfquant).

Each window is scored on its own, from scratch: logits at positions 0..L-2 predict tokens 1..L-1 (the first
token is context only, no BOS added), natural-log NLL summed over every scored token of every window, divided
by the number of scored tokens; perplexity = exp of that mean. This is hfquant's `perplexity` evaluator's rule.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor) -> dict:
    """{perplexity, nll, scored_tokens, windows} of `model` on `input_ids` (n, seq_len), one window at a time."""
    model.eval()
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for row in input_ids:
        ids = row[None].to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        target = ids[0, 1:]
        nll_sum += float(-torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())
        count += target.numel()
    nll = nll_sum / count
    return {"perplexity": math.exp(nll), "nll": nll, "scored_tokens": count, "windows": int(input_ids.shape[0])}
