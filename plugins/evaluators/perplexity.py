"""`perplexity`: token-level perplexity on the evaluation windows, and — against the baseline's reference —
KL divergence and top-1 agreement on the same tokens.

The baseline keeps its top-k log-probabilities per token (k = `kl_top_k`) plus the remaining "tail" mass, so
a sweep can cache it cheaply; KL is computed over those k + 1 buckets, which is a lower bound of the full KL
(exact when the baseline's mass is in its top k) and is recorded as such in the protocol.
"""

import math

import torch
from tqdm.auto import tqdm

from hfquant import hookimpl


class Perplexity:
    options = ("kl_top_k",)

    def __init__(self, kl_top_k: int = 100) -> None:
        if kl_top_k < 1:
            raise ValueError(f"perplexity: kl_top_k must be >= 1, got {kl_top_k}")
        self.k = kl_top_k

    def evaluate(self, model, windows, reference=None, label="model"):
        return self.combine(self.evaluate_windows(model, windows, range(len(windows)), reference, label), reference)

    @torch.no_grad()
    def evaluate_windows(self, model, windows, indices, reference=None, label="model"):
        """One record per window in `indices` (a process's share when evaluation is split across processes)."""
        device = next(model.parameters()).device
        records = []
        for i in tqdm(indices, desc=f"evaluate {label}", unit="window", leave=False):
            ids = windows.input_ids[i : i + 1].to(device)
            logits = model(input_ids=ids).logits[0, windows.score_from - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = ids[0, windows.score_from :]
            record = {"index": i, "nll": float(-logp.gather(1, target[:, None]).sum()), "count": target.numel()}
            if reference is None:
                v, idx = logp.topk(self.k, dim=-1)
                record.update(top_idx=idx.to(torch.int32).cpu(), top_logp=v.cpu(),
                              tail=torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-7)).cpu())
            else:
                ridx = reference["_top_idx"][i].long().to(device)
                rlogp = reference["_top_logp"][i].to(device)
                rtail = reference["_tail_logp"][i].to(device)
                qlogp = logp.gather(1, ridx)
                qtail = torch.log1p(-qlogp.exp().sum(-1).clamp(max=1 - 1e-7))
                kl = (rlogp.exp() * (rlogp - qlogp)).sum(-1) + rtail.exp() * (rtail - qtail)
                record.update(kl=float(kl.clamp(min=0).sum()), agree=int((logp.argmax(-1) == ridx[:, 0]).sum()))
            records.append(record)
        return records

    def combine(self, records, reference=None):
        """Metrics from every window's record, summed in window order (so any split gives the same floats)."""
        records = sorted(records, key=lambda r: r["index"])
        nll_sum, count, kl_sum, agree = 0.0, 0, 0.0, 0
        for r in records:
            nll_sum += r["nll"]
            count += r["count"]
            if reference is not None:
                kl_sum += r["kl"]
                agree += r["agree"]
        nll = nll_sum / count
        out = {"perplexity": math.exp(nll), "nll": nll, "scored_tokens": count}
        if reference is None:
            out.update(_top_idx=[r["top_idx"] for r in records], _top_logp=[r["top_logp"] for r in records],
                       _tail_logp=[r["tail"] for r in records])
        else:
            out.update(kl_divergence=kl_sum / count, top1_agreement=agree / count)
        return out

    def protocol(self) -> dict:
        return {"kl": f"KL(baseline || quantized) over the baseline's top-{self.k} tokens + one tail bucket, "
                      "per scored token, averaged (a lower bound of the full KL)"}


@hookimpl
def register_evaluators(register):
    register("perplexity", Perplexity)
