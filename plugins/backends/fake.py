"""`fake`: simulated quantization on any device — integer codes stored, dequantized for a float matmul.

It is the accuracy reference every other backend is compared with, and its modules are hfquant's storage
format (see `hfquant.formats.QuantLinear`).
"""

from tqdm.auto import tqdm

from hfquant import hookimpl
from hfquant.formats import QuantLinear
from hfquant.quant import PACKABLE_BITS


class FakeBackend:
    name = "fake"
    format = "hfquant"

    @staticmethod
    def supports(scheme, device):
        if scheme.format != "int":
            return f"scheme format {scheme.format!r} is not integer codes (use the backend that defines it)"
        for part, args in (("weights", scheme.weights), ("input_activations", scheme.input_activations)):
            if args is not None and part == "weights" and args.num_bits not in PACKABLE_BITS:
                return f"scheme.{part}.num_bits={args.num_bits} has no packed storage format (allowed: {', '.join(map(str, PACKABLE_BITS))})"
        if scheme.weights is None:
            return "activation-only schemes are not supported: the storage format quantizes weights"
        return None

    def convert(self, model, plan):
        for name, mp in tqdm(plan.modules.items(), desc="quantize", unit="module", leave=False):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)
            scale, zp = mp.weight_qparams
            setattr(parent, child, QuantLinear.from_linear(linear, mp.weight_args, scale, zp, mp.input_args, mp.input_qparams))
        return model


@hookimpl
def register_backends(register):
    register("fake", FakeBackend)
