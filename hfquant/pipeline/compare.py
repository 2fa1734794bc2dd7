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
from .quantize import convert

log = logging.getLogger("hfquant")


def out_of_domain_spec(spec):
    """The evaluation DataSpec of `evaluation.out_of_domain` (same seq_len / windows / evaluators), or None."""
    if spec.evaluation is None or not spec.evaluation.out_of_domain:
        return None
    return dataclasses.replace(spec.evaluation, name=spec.evaluation.out_of_domain, options={}, out_of_domain=None)


def out_of_domain_windows(tokenizer, spec):
    ood = out_of_domain_spec(spec)
    if ood is None:
        return None
    return data_mod.windows(tokenizer, types.SimpleNamespace(evaluation=ood, calibration=None), "evaluation")


def wants_rtn_reference(spec, own_format: bool) -> bool:
    return bool(spec.evaluation and spec.evaluation.compare_rtn and own_format and set(spec.algorithms) != {"rtn"})


@torch.no_grad()
def rtn_reference(model, spec, backend: str):
    """A round-to-nearest copy of `model` (same scheme, observer, backend): the baseline the algorithms beat."""
    work = copy.deepcopy(model)
    obs_cls = _observer(spec)
    plan = build_plan(work, spec.scheme, spec.observer, obs_cls, spec.observer_options)
    from ..plugins import registries

    round_scale = getattr(registries().backends.get(backend), "round_scale", None)
    quantize_in_memory(work, plan, make_chain({"rtn": {}}), lambda args: obs_cls(args, **spec.observer_options), round_scale)
    return convert(work, plan, backend)


def _observer(spec):
    from ..plugins import registries

    return registries().observers.get(spec.observer)


def score(model, windows, evaluators, baseline, ranks) -> dict:
    return {k: public(v) for k, v in evaluate_quantized(model, windows, evaluators, baseline, ranks).items()}


def baseline_scores(model, windows, evaluators, fingerprint, ranks) -> dict:
    return evaluate_baseline(model, windows, evaluators, fingerprint, ranks=ranks)


def describe(windows) -> Optional[dict]:
    return None if windows is None else dict(windows.protocol)
