"""`fake`: simulated quantization on any device — integer codes stored, dequantized for a float matmul.

It is the accuracy reference every other backend is compared with, and its modules are hfquant's storage
format (see `hfquant.formats.QuantLinear`).
"""

from hfquant import hookimpl
from hfquant.formats.qlinear import integer_format_problem, quantize_into
from hfquant.quant import PACKABLE_BITS


class FakeBackend:
    name = "fake"
    format = "hfquant"
    streaming = True  # saves QuantLinear's state dict, so checkpoints can be quantized tensor by tensor
    weight_bits = PACKABLE_BITS  # integer-code widths supports() accepts: refused before plugins load (docs/plugins.md)

    @staticmethod
    def supports(scheme, device):
        problem = integer_format_problem(scheme)
        if problem or scheme.weights.num_bits in PACKABLE_BITS:
            return problem
        allowed = ", ".join(map(str, PACKABLE_BITS))
        return f"scheme.weights.num_bits={scheme.weights.num_bits} has no packed storage format (allowed: {allowed})"

    def convert(self, model, plan):
        return quantize_into(model, plan)


@hookimpl
def register_backends(register):
    register("fake", FakeBackend)
