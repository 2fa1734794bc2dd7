"""Run the evaluators on the baseline and the quantized model over the same windows.

The baseline's results (including private reference data such as top-k log-probs) are cached on disk by
(model fingerprint, evaluation tokens, protocol, evaluator) so a sweep computes them once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional

import torch

from ..cache import cache_root
from ..plugins import registries
from .integrity import check_baseline_finite


def cache_dir() -> str:
    return os.path.join(cache_root(), "baseline")


def public(metrics: dict) -> dict:
    """Drop private reference data (keys starting with '_') before reporting."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def make_evaluators(names: List[str], options: Optional[Dict[str, dict]] = None, batch_size=None) -> dict:
    """The evaluators by name; `batch_size` (evaluation.batch_size) goes to those that declare the option."""
    options = options or {}
    made = {}
    for n in names:
        cls = registries().evaluators.get(n)
        kwargs = dict(options.get(n, {}))
        if batch_size is not None and "batch_size" in getattr(cls, "options", ()):
            kwargs.setdefault("batch_size", batch_size)
        made[n] = cls(**kwargs)
    return made


def _key(fingerprint: str, windows, name: str, evaluator) -> str:
    proto = getattr(evaluator, "protocol", lambda: {})()
    blob = json.dumps([fingerprint, windows.token_hash, windows.protocol, name, proto, type(evaluator).__qualname__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_evaluator(ev, model, windows, reference, label: str, ranks=None) -> dict:
    """`ev.evaluate`, or — across several processes, for evaluators that can split windows (`evaluate_windows`
    + `combine`) — each process's share, gathered and combined in window order."""
    if ranks is None or ranks.world == 1 or not hasattr(ev, "evaluate_windows"):
        return ev.evaluate(model, windows, reference=reference, label=label)
    mine = ev.evaluate_windows(model, windows, ranks.shard(len(windows)), reference, label)
    return ev.combine([r for part in ranks.gather(mine) for r in part], reference)


def evaluate_baseline(model, windows, evaluators: dict, fingerprint: str, use_cache: bool = True, ranks=None) -> dict:
    """{evaluator name: metrics} for the unquantized model, from the cache when possible (only rank 0 writes it).
    Non-finite metrics (NaN/Inf logits) raise `NonFiniteError`: no quantized result could be compared with them."""
    results = {}
    for name, ev in evaluators.items():
        path = os.path.join(cache_dir(), _key(fingerprint, windows, name, ev) + ".pt")
        if use_cache and os.path.isfile(path):
            try:
                results[name] = torch.load(path, weights_only=True)
                results[name]["cached"] = True
                continue
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                pass
        metrics = run_evaluator(ev, model, windows, None, "baseline", ranks)
        check_baseline_finite({name: metrics})  # stops the run before quantizing; never cached
        if use_cache and (ranks is None or ranks.main):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            os.close(fd)
            torch.save(metrics, tmp)
            os.replace(tmp, path)
        results[name] = dict(metrics, cached=False)
    return results


def evaluate_quantized(model, windows, evaluators: dict, baseline: dict, ranks=None) -> dict:
    return {name: run_evaluator(ev, model, windows, baseline[name], "quantized", ranks) for name, ev in evaluators.items()}


def protocols(evaluators: dict) -> dict:
    out = {}
    for name, ev in evaluators.items():
        out.update(getattr(ev, "protocol", lambda: {})())
    return out
