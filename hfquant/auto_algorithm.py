"""`algorithm=auto` (the default): the best measured recipe that the scheme, backend, data and model allow.

Chosen at config time from what is known then, and narrowed after loading when the model's decoder layout is
one a weight editor cannot fold into (the editor is dropped and the run says so, instead of refusing the
model as an explicit `algorithm=awq` does). The reason is logged and kept in the report (`run.algorithm_reason`).
Measurements behind the choices: docs/benchmarks.md, "Algorithms side by side".
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from .scheme import QuantScheme

AUTO = "auto"
#: why float zero points should not be paired with plain round-to-nearest (docs/benchmarks.md, "Twelfth pass")
RTN_FLOAT_ZERO = ("round-to-nearest with float zero points measured the worst 4-bit rounding at group 128 — 1.500 / "
                  "1.558 perplexity ratio in / out of domain against 1.337 / 1.245 with integer zero points and "
                  "1.323 / 1.237 with hqq")


def choose(scheme: QuantScheme, backend_format: str, has_data: bool) -> Tuple[Dict[str, dict], str]:
    """({algorithm: options} in order, why) for a run of `scheme` whose backend writes `backend_format`
    ("hfquant" for hfquant's own backends, "" while backend=auto is unresolved)."""
    if scheme.format != "int" or backend_format not in ("", "hfquant"):
        return {"rtn": {}}, f"the {backend_format or scheme.format} backend computes its own codes"
    if scheme.weights is None:
        return {"rtn": {}}, "no weights are quantized"
    if not has_data:
        if _low_bit_float_zero(scheme):
            return {"hqq": {}}, ("no calibration data (calibration=none) and float zero points: HQQ's data-free "
                                 "zero-point optimisation (" + RTN_FLOAT_ZERO + ")")
        return {"rtn": {}}, "no calibration data (calibration=none): round-to-nearest (algorithm=hqq is data-free too)"
    activations = scheme.input_activations
    bits = scheme.weights.num_bits
    if activations is not None and activations.dynamic:
        return {"smoothquant": {}, "gptq": {}}, "int8 activations: SmoothQuant (α searched per layer group), then GPTQ codes"
    if bits >= 8:
        return {"rtn": {}}, f"{bits}-bit weights lose well under 1% with round-to-nearest"
    if activations is not None:
        return {"gptq": {}}, "static activation scales are observed before the codes, so no weight edits: GPTQ alone"
    return {"awq": {}, "gptq": {}}, f"{bits}-bit weights: AWQ-style scales, then GPTQ codes"


def named_recipe_warning(scheme: QuantScheme, algorithms: Iterable[str]) -> Optional[str]:
    """What a run whose algorithms were named (not auto) should be warned about, or None: plain round-to-nearest
    with float zero points (logged once, when the run starts)."""
    if list(algorithms) == ["rtn"] and _low_bit_float_zero(scheme):
        return (f"algorithm=rtn with float zero points: {RTN_FLOAT_ZERO}; a calibrated recipe (algorithm=auto, e.g. "
                "[awq,gptq]) or the data-free algorithm=hqq makes better codes for the same bits")
    return None


def _low_bit_float_zero(scheme: QuantScheme) -> bool:
    """hfquant integer codes below 8 bits with float zero points: where plain round-to-nearest measured worst."""
    weights = scheme.weights
    return scheme.format == "int" and weights is not None and weights.float_zero_point and weights.num_bits < 8
