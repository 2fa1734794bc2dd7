"""What a run's quality is compared with, besides the unquantized model: text outside the calibration domain,
and round-to-nearest with the same scheme (what the chosen algorithms improve on).

Error-correcting algorithms fit their calibration text; reported only on that text's domain they can look better
than they are. `evaluation.out_of_domain` names a second dataset (default: `prose`, English fiction no
calibration set contains) scored with the same protocol; `evaluation.compare_rtn` quantizes a copy of the model
with round-to-nearest (same scheme, observer and backend) and scores it on both, so the table shows what the
algorithms bought.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
from typing import Optional

import torch

from . import data as data_mod
from .calibrate import build_plan
from .evaluate import evaluate_baseline, evaluate_quantized, public
from .layerwise import make_chain, quantize_in_memory

log = logging.getLogger("hfquant")


def out_of_domain_spec(spec):
    """The evaluation DataSpec of `evaluation.out_of_domain` (same seq_len / windows / evaluators), or None."""
    if spec.evaluation is None or not spec.evaluation.out_of_domain:
        return None
    return dataclasses.replace(spec.evaluation, name=spec.evaluation.out_of_domain, options={}, out_of_domain=None)


def out_of_domain_windows(tokenizer, spec):
    """The second domain's windows; None (with a warning naming the way to get it) when its text is not on this
    machine — a missing extra measurement must not stop the run it accompanies."""
    ood = out_of_domain_spec(spec)
    if ood is None:
        return None
    try:
        return data_mod.windows(tokenizer, types.SimpleNamespace(evaluation=ood, calibration=None), "evaluation")
    except data_mod.DataError as exc:
        log.warning("skipping the out-of-domain evaluation (evaluation.out_of_domain=%s): %s", ood.name, exc)
        return None


def wants_rtn_reference(spec, own_format: bool) -> bool:
    return bool(spec.evaluation and spec.evaluation.compare_rtn and own_format and set(spec.algorithms) != {"rtn"})


@torch.no_grad()
def rtn_reference(model, spec, backend: str):
    """A round-to-nearest copy of `model` (same scheme, observer, backend): the baseline the algorithms beat."""
    work = copy.deepcopy(model)
    obs_cls = _observer(spec)
    plan = build_plan(work, spec.scheme, spec.observer, obs_cls, spec.observer_options)
    from ..plugins import registries

    from . import embedding

    round_scale = getattr(registries().backends.get(backend), "round_scale", None)
    quantize_in_memory(work, plan, make_chain({"rtn": {}}), lambda args: obs_cls(args, **spec.observer_options), round_scale)
    return embedding.convert_with_embedding(work, spec.scheme, plan, backend, round_scale)[0]  # as the run's model


def _observer(spec):
    from ..plugins import registries

    return registries().observers.get(spec.observer)


def score(model, windows, evaluators, baseline, ranks) -> dict:
    return {k: public(v) for k, v in evaluate_quantized(model, windows, evaluators, baseline, ranks).items()}


def _rtn_cache_path(spec, backend: str, fingerprint: str, windows) -> str:
    """Round-to-nearest scores depend on the model, scheme, observer, backend and windows only: cached like the
    baseline, so a repeated run (or a sweep over algorithms) pays for them once."""
    import hashlib
    import json
    import os

    from .evaluate import cache_dir

    blob = json.dumps([fingerprint, spec.scheme.to_dict(), spec.observer, spec.observer_options, backend,
                       windows.token_hash, windows.protocol, sorted(spec.evaluation.evaluators), "rtn-v1"],
                      sort_keys=True, default=str)
    return os.path.join(cache_dir(), "rtn-" + hashlib.sha256(blob.encode()).hexdigest()[:24] + ".pt")


def cached_rtn_scores(model, spec, backend: str, fingerprint: str, sets: dict, evaluators, ranks) -> dict:
    """{label: scores} of round-to-nearest on each `(windows, baseline)` of `sets`, from the cache when there."""
    import os

    out, missing = {}, {}
    for label, (windows, baseline) in sets.items():
        path = _rtn_cache_path(spec, backend, fingerprint, windows)
        if os.path.isfile(path):
            try:
                out[label] = {k: dict(v, cached=True) for k, v in torch.load(path, weights_only=True).items()}
                continue
            except Exception:  # a torn entry is recomputed
                pass
        missing[label] = (windows, baseline, path)
    if missing:
        rtn = rtn_reference(model, spec, backend)
        for label, (windows, baseline, path) in missing.items():
            out[label] = score(rtn, windows, evaluators, baseline, ranks)
            if ranks is None or ranks.main:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save(out[label], path + ".tmp")
                os.replace(path + ".tmp", path)
        del rtn
    return out


def baseline_scores(model, windows, evaluators, fingerprint, ranks) -> dict:
    return evaluate_baseline(model, windows, evaluators, fingerprint, ranks=ranks)


def describe(windows) -> Optional[dict]:
    return None if windows is None else dict(windows.protocol)
