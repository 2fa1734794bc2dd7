"""Built-in scheme presets under the names people know (compressed-tensors / llm-compressor vocabulary)."""

from hfquant import QuantArgs, QuantScheme, hookimpl

W8_CHANNEL = QuantArgs(num_bits=8, symmetric=True, strategy="channel")

PRESETS = (
    QuantScheme(
        "w8a16",
        weights=W8_CHANNEL,
        description="int8 weights, per output channel, symmetric; activations stay in floating point",
    ),
    QuantScheme(
        "w4a16",
        weights=QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=128, full_range=True),
        description="int4 weights in groups of 128 input columns, symmetric full range (each group's largest-magnitude "
                    "value maps to -8, as llama.cpp's Q4_0; all 16 levels used); activations in floating point",
    ),
    QuantScheme(
        "w4a16-asym",
        weights=QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128),
        description="int4 weights in groups of 128, asymmetric (a zero point per group)",
    ),
    QuantScheme(
        "w8a8",
        weights=W8_CHANNEL,
        input_activations=QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True),
        description="int8 per-channel weights and int8 activations quantized per token at run time",
    ),
    QuantScheme(
        "w8a8-static",
        weights=W8_CHANNEL,
        input_activations=QuantArgs(num_bits=8, symmetric=True, strategy="tensor"),
        description="int8 per-channel weights and int8 activations with one static scale per tensor, calibrated",
    ),
    QuantScheme(
        "int8-tensor",
        weights=QuantArgs(num_bits=8, symmetric=True, strategy="tensor"),
        description="int8 weights with a single scale per tensor, symmetric; activations in floating point",
    ),
)


@hookimpl
def register_schemes(register):
    for scheme in PRESETS:
        register(scheme.name, scheme)
