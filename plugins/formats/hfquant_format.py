"""`hfquant`: packed integer codes with float32 scales and integer zero points (`QuantLinear`'s state dict),
declared as `quant_method: hfquant`; transformers reloads it after `import hfquant`."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from hfquant import hookimpl
from hfquant.formats.qlinear import QuantLinear, integer_format_problem


class HfquantFormat:
    name = "hfquant"

    def __init__(self, scheme) -> None:
        self.scheme = scheme

    @staticmethod
    def problem(scheme) -> Optional[str]:
        return integer_format_problem(scheme)

    @staticmethod
    @torch.no_grad()
    def compress(mp, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        weight, bias = tensors["weight"], tensors.get("bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        scale, zero_point = mp.weight_qparams
        module = QuantLinear.from_linear(linear, mp.weight_args, scale, zero_point, mp.input_args, mp.input_qparams,
                                         codes=mp.weight_codes)
        return dict(module.state_dict())

    @staticmethod
    def parameter_names(mp, has_bias: bool) -> List[str]:
        probe = QuantLinear(8, 1, has_bias, mp.weight_args, mp.input_args, device="meta")
        return list(probe.state_dict())

    @staticmethod
    def quantization_config(plan, backend: str):
        from hfquant.pipeline.save import quantization_config

        return quantization_config(plan, backend)


@hookimpl
def register_formats(register):
    register("hfquant", HfquantFormat)
