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
    options = ("kl_top_k", "batch_size")

    def __init__(self, kl_top_k: int = 100, batch_size="auto") -> None:
        if kl_top_k < 1:
            raise ValueError(f"perplexity: kl_top_k must be >= 1, got {kl_top_k}")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"perplexity: batch_size must be a positive integer or 'auto', got {batch_size!r}")
        self.k = kl_top_k
        self.batch_size = batch_size

    def evaluate(self, model, windows, reference=None, label="model"):
        return self.combine(self.evaluate_windows(model, windows, range(len(windows)), reference, label), reference)

    LOGITS_BUDGET = 2 * 2**30  # bytes of float32 logits + log-probabilities held for one batch on an accelerator

    def windows_per_forward(self, device, seq_len: int = 512, vocab_size: int = 0) -> int:
        """'auto': one window per forward on CPU — batches were measured slower there (a 512-token window already
        keeps the GEMMs busy, docs/benchmarks.md) — and on accelerators, where one window leaves them idle, up to 8
        while the batch's logits stay within LOGITS_BUDGET (2048 tokens × a 128k vocabulary: one window)."""
        if self.batch_size != "auto":
            return self.batch_size
        if torch.device(device).type == "cpu":
            return 1
        per_window = 2 * 4 * seq_len * max(vocab_size, 1)  # logits and their log-softmax, float32
        return max(1, min(8, self.LOGITS_BUDGET // per_window))

    @torch.no_grad()
    def evaluate_windows(self, model, windows, indices, reference=None, label="model"):
        """One record per window in `indices` (a process's share when evaluation is split across processes).
        Windows go through the model `batch_size` at a time: all have the same length, so there is no padding,
        and each window's record comes from its own rows of the logits — the same numbers as one at a time."""
        device = next(model.parameters()).device
        indices = list(indices)
        vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
        step = self.windows_per_forward(device, windows.input_ids.shape[1], vocab)
        records = []
        with tqdm(total=len(indices), desc=f"evaluate {label}", unit="window", leave=False) as bar:
            for start in range(0, len(indices), step):
                batch = indices[start : start + step]
                ids = windows.input_ids[batch].to(device)
                logits = model(input_ids=ids).logits
                for row, i in enumerate(batch):
                    records.append(self._record(i, logits[row], ids[row], windows.score_from, reference, device))
                del logits
                bar.update(len(batch))
        return records

    def _record(self, i, logits, ids, score_from, reference, device) -> dict:
        """Negative log-likelihood of window `i` — and its top-k (baseline) or KL / top-1 against the reference —
        from one forward's logits: perplexity, KL and top-1 share it."""
        logp = torch.log_softmax(logits[score_from - 1 : -1].float(), dim=-1)
        target = ids[score_from:]
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
        return record

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
