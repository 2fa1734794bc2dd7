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

from ..plugins import registries


def cache_dir() -> str:
    base = os.environ.get("HFQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hfquant"
    )
    return os.path.join(base, "baseline")


def public(metrics: dict) -> dict:
    """Drop private reference data (keys starting with '_') before reporting."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def make_evaluators(names: List[str], options: Optional[Dict[str, dict]] = None) -> dict:
    options = options or {}
    return {n: registries().evaluators.get(n)(**options.get(n, {})) for n in names}


def _key(fingerprint: str, windows, name: str, evaluator) -> str:
    proto = getattr(evaluator, "protocol", lambda: {})()
    blob = json.dumps([fingerprint, windows.token_hash, windows.protocol, name, proto, type(evaluator).__qualname__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_baseline(model, windows, evaluators: dict, fingerprint: str, use_cache: bool = True) -> dict:
    """{evaluator name: metrics} for the unquantized model, from the cache when possible."""
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
        metrics = ev.evaluate(model, windows, reference=None, label="baseline")
        if use_cache:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            os.close(fd)
            torch.save(metrics, tmp)
            os.replace(tmp, path)
        results[name] = dict(metrics, cached=False)
    return results


def evaluate_quantized(model, windows, evaluators: dict, baseline: dict) -> dict:
    return {name: ev.evaluate(model, windows, reference=baseline[name], label="quantized") for name, ev in evaluators.items()}


def protocols(evaluators: dict) -> dict:
    out = {}
    for name, ev in evaluators.items():
        out.update(getattr(ev, "protocol", lambda: {})())
    return out
