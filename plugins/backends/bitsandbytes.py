"""`bitsandbytes`: LLM.int8 and 4-bit NF4 / FP4 through transformers' own bitsandbytes integration, saved in
transformers' native format so that `from_pretrained` reloads the folder *without* hfquant installed.

bitsandbytes quantizes with its own absmax statistics (blockwise for 4-bit, row-wise for int8), so hfquant's
observers do not apply; the report says so. CUDA when present, bitsandbytes' CPU path otherwise.
"""

import os
import shutil
import tempfile

import torch

from hfquant import QuantArgs, QuantScheme, hookimpl

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
                 "bnb_4bit_compute_dtype": "float32"},
        description="4-bit NormalFloat in blocks of 64 with double quantization (QLoRA's format)",
    ),
    QuantScheme(
        "fp4", weights=QuantArgs(num_bits=4, strategy="group", group_size=64), format="bitsandbytes",
        options={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                 "bnb_4bit_compute_dtype": "float32"},
        description="4-bit float in blocks of 64",
    ),
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bnb_config(scheme):
    from transformers import BitsAndBytesConfig

    opts = dict(scheme.options)
    if "bnb_4bit_compute_dtype" in opts:
        opts["bnb_4bit_compute_dtype"] = DTYPES[opts["bnb_4bit_compute_dtype"]]
    skip = [p for p in scheme.ignore if not p.startswith("re:")]
    return BitsAndBytesConfig(llm_int8_skip_modules=skip or None, **opts)


class BitsAndBytesBackend:
    name = "bitsandbytes"
    format = "bitsandbytes"  # saved by transformers itself, not in hfquant's format

    @staticmethod
    def supports(scheme, device):
        if scheme.format != "bitsandbytes":
            return (f"scheme {scheme.name!r} is hfquant's integer format; bitsandbytes runs its own formats: "
                    "scheme=llm-int8, nf4 or fp4")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        return None

    def convert(self, model, plan):
        """Round-trip through transformers' loader, the only path that yields its native serializable format."""
        from transformers import AutoModel, AutoModelForCausalLM

        device = next(model.parameters()).device
        tmp = tempfile.mkdtemp(prefix="hfquant-bnb-")
        try:
            model.save_pretrained(tmp)
            auto = AutoModelForCausalLM if hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__ else AutoModel
            quantized = auto.from_pretrained(tmp, quantization_config=bnb_config(plan.scheme),
                                             device_map={"": str(device)}, dtype=torch.float32)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return quantized.eval()


@hookimpl
def register_schemes(register):
    for scheme in PRESETS:
        register(scheme.name, scheme)


@hookimpl
def register_backends(register):
    register("bitsandbytes", BitsAndBytesBackend)
