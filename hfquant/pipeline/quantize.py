"""Quantize: pick the backend, the error statistics of saved codes, convert the model in place."""

from __future__ import annotations

import logging
from typing import Tuple

import torch

from ..config import ConfigError, backend_problem, written_from
from ..plugins import registries

log = logging.getLogger("hfquant")

# `backend=auto` tries these in order and takes the first that supports the scheme on the device: real
# integer kernels first, the simulated reference last.
AUTO_PREFERENCE = ("cpu", "bitsandbytes", "fake")


def backend_format(backend) -> str:
    """The format a backend's kernels run (and its folders are saved in)."""
    return getattr(backend, "format", "hfquant")


def resolve_backend(name: str, scheme, device: str, fmt: str = "auto") -> Tuple[str, str]:
    """(backend name, why it was chosen); with `fmt` set, only backends running that format qualify."""
    if name != "auto":
        return name, "asked for by backend=" + name
    backends = registries().backends
    order = [n for n in AUTO_PREFERENCE if n in backends] + [n for n in backends.names() if n not in AUTO_PREFERENCE]
    refusals = []
    for candidate in order:
        reason = backend_problem(candidate, scheme, device)
        if reason is None and fmt != "auto" and backend_format(backends.get(candidate)) != written_from(fmt):
            reason = f"runs format {backend_format(backends.get(candidate))}, not {written_from(fmt)}"
        if reason is None:
            why = f"auto: first of {', '.join(order)} that runs {scheme.name} on {device}"
            if refusals:
                why += " (" + "; ".join(refusals) + ")"
            return candidate, why
        refusals.append(f"{candidate}: {reason}")
    raise ConfigError(f"no backend runs scheme {scheme.name!r} on {device}: " + "; ".join(refusals))


def error_stats(err: float, energy: float) -> dict:
    rel = err / energy if energy else 0.0
    sqnr = float("inf") if rel == 0 else -10.0 * torch.log10(torch.tensor(rel)).item()
    return {"weight_relative_mse": rel, "weight_sqnr_db": sqnr}


def check_model_fits(model, scheme, backend_name: str) -> None:
    """A backend's optional `check_model(model, scheme)`: refusals that need the loaded model's shapes, made
    right after it loads rather than after the baseline evaluation."""
    check = getattr(registries().backends.get(backend_name), "check_model", None)
    if check is not None:
        check(model, scheme)


def scale_rounding(backend_name: str, fmt: str, dtype: torch.dtype = torch.float32, scheme=None, options=None):
    """How scales are rounded before any code is computed: the backend's kernels' precision (`round_scale`), then
    the format's for a model of `dtype` (`round_scale_for(dtype)`: GGUF's float16 `d`, compressed-tensors' scales in
    the model's dtype); None when neither rounds."""
    fmt_obj = None if fmt == "auto" else registries().formats.get(fmt)(scheme, **(options or {}))
    for_dtype = getattr(fmt_obj, "round_scale_for", None)
    rounders = [getattr(registries().backends.get(backend_name), "round_scale", None),
                for_dtype(dtype) if for_dtype is not None else None]
    rounders = [r for r in rounders if r is not None]
    if not rounders:
        return None
    if len(rounders) == 1:
        return rounders[0]
    return lambda s: rounders[1](rounders[0](s))


def check_format_fits(model, scheme, fmt: str) -> None:
    """A format's optional `check_model(model, scheme, targets)` (e.g. compressed-tensors refusing ragged groups),
    right after the model (or its meta skeleton, when streaming) is built."""
    if fmt == "auto":
        return
    check = getattr(registries().formats.get(fmt), "check_model", None)
    if check is not None:
        from ..plan import target_modules

        check(model, scheme, target_modules(model, scheme))


def convert(model, plan, backend_name: str):
    backend = registries().backends.get(backend_name)()
    log.info("quantizing %d modules with backend %s", len(plan.modules), backend_name)
    return backend.convert(model, plan)
