"""`bitsandbytes`: LLM.int8 and 4-bit NF4 / FP4 through transformers' own bitsandbytes integration, saved in
transformers' native format so that `from_pretrained` reloads the folder *without* hfquant installed.

bitsandbytes quantizes with its own absmax statistics (blockwise for 4-bit, row-wise for int8), so hfquant's
observers do not apply; the report says so. CUDA when present, bitsandbytes' CPU path otherwise.
"""

import logging
import shutil
import tempfile
from typing import Dict, List, Optional

import torch

from hfquant import QuantArgs, QuantScheme, hookimpl
from hfquant.config import ConfigError, scheme_changes

log = logging.getLogger("hfquant")

PRESETS = (
    QuantScheme(
        "llm-int8", weights=QuantArgs(num_bits=8, strategy="channel"),
        input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True), format="bitsandbytes",
        options={"load_in_8bit": True, "llm_int8_threshold": 6.0},
        description="LLM.int8(): int8 row-wise weights and activations, outlier features (|x| > threshold) in 16-bit",
    ),
    QuantScheme(
        "nf4", weights=QuantArgs(num_bits=4, strategy="group", group_size=64), format="bitsandbytes",
        options={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                 "bnb_4bit_compute_dtype": "auto"},
        description="4-bit NormalFloat in blocks of 64 with double quantization (QLoRA's format)",
    ),
    QuantScheme(
        "fp4", weights=QuantArgs(num_bits=4, strategy="group", group_size=64), format="bitsandbytes",
        options={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                 "bnb_4bit_compute_dtype": "auto"},
        description="4-bit float in blocks of 64",
    ),
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bnb_config(scheme, skip, model_dtype: torch.dtype = torch.float32):
    """transformers converts every Linear except those in `llm_int8_skip_modules` (and, when that is None,
    its own default list), so `skip` names each Linear hfquant does not quantize: an explicit list, even empty.
    A 4-bit compute dtype of "auto" is the model's own dtype."""
    from transformers import BitsAndBytesConfig

    opts = dict(scheme.options)
    if "bnb_4bit_compute_dtype" in opts:
        name = opts["bnb_4bit_compute_dtype"]
        opts["bnb_4bit_compute_dtype"] = model_dtype if name == "auto" else DTYPES[name]
    return BitsAndBytesConfig(llm_int8_skip_modules=list(skip), **opts)


def linears_to_skip(model, plan, cpu_skips) -> List[str]:
    """The Linears outside the plan (the ignore list, non-matching targets, regex patterns resolved to names),
    in model order, then the CPU skips."""
    outside = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in plan.modules]
    return outside + sorted(cpu_skips)


def converted_names(model) -> List[str]:
    """The Linears bitsandbytes actually quantized."""
    import bitsandbytes as bnb

    return [name for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def left_unquantized(plan, cpu_skips: Dict[str, str], converted: List[str]) -> Dict[str, str]:
    """Planned Linears that are not bitsandbytes modules after the round trip, with the reason, for the report."""
    left = {}
    for name in plan.modules:
        if name in cpu_skips:
            left[name] = f"bitsandbytes' CPU 4-bit kernel cannot run it: {cpu_skips[name]}"
        elif name not in converted:
            left[name] = "transformers' bitsandbytes integration keeps it in full precision (_keep_in_fp32_modules)"
    return left


# bitsandbytes' 4-bit CPU kernel (used on CPUs with AVX512-BF16) repacks each weight in tiles of 32 output rows
# and needs whole blocks of 64 values per row (`_convert_weight_packed_for_cpu`); other shapes crash in its first
# forward. hfquant leaves such Linears unquantized on CPU whatever this machine's CPU, so a folder made here
# also runs on a machine that has the feature.
CPU_4BIT_BLOCK = 64
CPU_4BIT_ROW_TILE = 32


def cpu_4bit_problem(in_features: int, out_features: int) -> Optional[str]:
    """Why bitsandbytes' CPU 4-bit kernel cannot run a Linear of this shape, or None."""
    problems = []
    if in_features % CPU_4BIT_BLOCK:
        problems.append(f"in_features={in_features} is not a multiple of its block size {CPU_4BIT_BLOCK}")
    if out_features % CPU_4BIT_ROW_TILE:
        problems.append(f"out_features={out_features} is not a multiple of {CPU_4BIT_ROW_TILE}")
    return " and ".join(problems) or None


def cpu_4bit_skips(model, names) -> Dict[str, str]:
    """Target Linears (by name) that bitsandbytes' CPU 4-bit kernel cannot run: name → reason."""
    skips = {}
    for name in names:
        linear = model.get_submodule(name)
        reason = cpu_4bit_problem(linear.in_features, linear.out_features)
        if reason:
            skips[name] = reason
    return skips


def runnable_check(model, scheme, names) -> Dict[str, str]:
    """The targets to leave unquantized on this model's device (empty off CPU or for 8-bit); refuses, with the
    way out, when that would be every target."""
    device = next(model.parameters()).device
    if device.type != "cpu" or not scheme.options.get("load_in_4bit"):
        return {}
    names = list(names)
    skips = cpu_4bit_skips(model, names)
    if skips and len(skips) == len(names):
        first, reason = next(iter(skips.items()))
        raise ConfigError(
            f"scheme {scheme.name!r} on CPU: bitsandbytes' CPU 4-bit kernel cannot run any of the "
            f"{len(skips)} target Linear(s) of this model (e.g. {first!r}: {reason}); use backend=cpu "
            "scheme=w4a16 (hfquant's int4 kernels), or scheme=llm-int8")
    return skips


class BitsAndBytesBackend:
    name = "bitsandbytes"
    format = "bitsandbytes"  # saved by transformers itself, not in hfquant's format
    weight_bits = ()  # runs no integer-code scheme, only its own formats (docs/plugins.md)

    @staticmethod
    def supports(scheme, device):
        if scheme.format != "bitsandbytes":
            return (f"scheme {scheme.name!r} is hfquant's integer format; bitsandbytes runs its own formats: "
                    "scheme=llm-int8, nf4 or fp4")
        changed = scheme_changes(scheme)  # bitsandbytes has one quantizer per preset: a change would be ignored
        if changed:
            return (f"bitsandbytes quantizes {scheme.name} its own way and cannot apply {', '.join(changed)}; drop "
                    "the change, or use hfquant's integer schemes (w4a16, w8a16, w8a8) with backend=cpu or fake")
        if scheme.embedding is not None:
            return "it keeps embeddings in floating point (set scheme.embedding=null)"
        compute = scheme.options.get("bnb_4bit_compute_dtype", "auto")
        if compute != "auto" and compute not in DTYPES:
            return f"scheme.options.bnb_4bit_compute_dtype must be auto, {', '.join(DTYPES)}; got {compute!r}"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        return None

    @staticmethod
    def check_model(model, scheme):
        """Right after the model loads, before any evaluation: refuse a model none of whose targets can run."""
        from hfquant.plan import target_modules

        runnable_check(model, scheme, target_modules(model, scheme))

    def convert(self, model, plan):
        """Round-trip through transformers' loader, the only path that yields its native serializable format.
        On CPU, 4-bit Linears whose shape bitsandbytes' CPU kernel cannot run stay unquantized (listed in
        `model.hfquant_left_unquantized` for the report); if that is every target, the run is refused."""
        from transformers import AutoModel, AutoModelForCausalLM

        from hfquant.pipeline.load import float_dtype

        device, dtype = next(model.parameters()).device, float_dtype(model)
        skips = runnable_check(model, plan.scheme, plan.modules)
        config = bnb_config(plan.scheme, linears_to_skip(model, plan, skips), dtype)
        tmp = tempfile.mkdtemp(prefix="hfquant-bnb-")
        try:
            model.save_pretrained(tmp)
            auto = AutoModelForCausalLM if hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__ else AutoModel
            quantized = auto.from_pretrained(tmp, quantization_config=config,
                                             device_map={"": str(device)}, dtype=dtype)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        converted = converted_names(quantized)
        unplanned = sorted(set(converted) - set(plan.modules))
        if unplanned:  # a bug here or in transformers: the report would describe a model it did not make
            raise RuntimeError(f"bitsandbytes quantized Linears outside the plan: {unplanned}")
        quantized.hfquant_left_unquantized = left_unquantized(plan, skips, converted)
        for name, reason in quantized.hfquant_left_unquantized.items():
            log.warning("bitsandbytes %s: leaving %s unquantized (%s)", plan.scheme.name, name, reason)
        return quantized.eval()


@hookimpl
def register_schemes(register):
    for scheme in PRESETS:
        register(scheme.name, scheme)


@hookimpl
def register_backends(register):
    register("bitsandbytes", BitsAndBytesBackend)
