"""`cpu`: hfquant's CPU kernels — integer weights stay integers in memory and run on torch's integer kernels.

- w8a16: int8 per-channel weights on `torch._weight_int8pack_mm`, 16-bit (bf16) activations.
- w4a16: int4 group-wise weights on `torch._weight_int4pack_mm_for_cpu`, bf16 activations (a 128-column group
  is fed to the kernel as two 64-column groups with the same scale, so ragged shapes like 576 need no padding).
- w8a8: int8 per-channel weights × int8 activations quantized per token at run time, on `torch._int_mm`
  (int32 accumulation), rescaled by the token and channel scales. On a CPU without int8 dot products (no VNNI or
  AMX, e.g. AVX2 only) `_int_mm` is a scalar loop, so the same integer sums run as a float32 GEMM over the codes.

Scales are rounded to bf16 *before* the codes are computed, so the saved folder (hfquant's format) holds
exactly the numbers the kernels use, and a reload reproduces the logits bit for bit.
"""

import logging

import torch

from hfquant import hookimpl
from hfquant.formats.kernels import int8_matmul_fast, kernel_module_for
from hfquant.formats.qlinear import integer_format_problem, quantize_into


class CpuBackend:
    name = "cpu"
    format = "hfquant"
    streaming = True  # saves QuantLinear's state dict, so checkpoints can be quantized tensor by tensor
    weight_bits = (4, 8)  # integer-code widths supports() accepts: refused before plugins load (docs/plugins.md)

    @staticmethod
    def round_scale(scale):
        """Scales are rounded to bf16 first: what the kernels will use, exactly, and what gets saved."""
        return scale.to(torch.bfloat16).float()

    @staticmethod
    def supports(scheme, device):
        problem = integer_format_problem(scheme)
        if problem:
            return problem
        if not str(device).startswith("cpu"):
            return f"runs on CPU only (device is {device})"
        w, a = scheme.weights, scheme.input_activations
        if a is not None:
            if not a.dynamic or a.strategy != "token" or a.num_bits != 8 or not a.symmetric:
                return "activations must be int8 symmetric dynamic per-token (static activation scales are not supported)"
            if not (w.num_bits == 8 and w.strategy == "channel" and w.symmetric):
                return "w8a8 needs int8 per-channel symmetric weights"
            return None
        if w.num_bits == 8:
            return None if (w.strategy == "channel" and w.symmetric) else "8-bit weights must be per-channel symmetric"
        if w.num_bits == 4:
            if w.strategy != "group" or w.group_size % 32:
                return "4-bit weights must be per-group with a group size that is a multiple of 32"
            return None
        return f"{w.num_bits}-bit weights have no CPU kernel (allowed: {', '.join(map(str, CpuBackend.weight_bits))})"

    def convert(self, model, plan):
        if not int8_matmul_fast() and any(mp.input_args is not None for mp in plan.modules.values()):
            logging.getLogger("hfquant").warning(
                "this CPU has no int8 dot-product instructions (VNNI or AMX): w8a8 sums its int8 products in float32 "
                "(prompts as float32 GEMMs over the codes, no faster than the unquantized model; decoding on torch's "
                "int8-weight kernel, fast with hfquant.compile_decoding) — w8a16 decodes as fast on this CPU and "
                "stays closer to the unquantized model")
        return quantize_into(model, plan, make=kernel_module_for, round_scale=self.round_scale, desc="quantize (cpu kernels)")


@hookimpl
def register_backends(register):
    register("cpu", CpuBackend)
