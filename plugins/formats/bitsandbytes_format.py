"""`bitsandbytes`: transformers' native bitsandbytes serialization (NF4 / FP4 blocks with optional double
quantization, LLM.int8 row-wise int8), which `from_pretrained` reloads without hfquant installed.

bitsandbytes chooses its own codes (absmax per block or row), so `compress` ignores the plan's qparams; it is
the same computation transformers' loader performs (`tests/test_formats_protocol.py` checks byte equality).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from hfquant import hookimpl


class BitsAndBytesFormat:
    name = "bitsandbytes"

    def __init__(self, scheme) -> None:
        self.scheme = scheme

    @staticmethod
    def problem(scheme) -> Optional[str]:
        if scheme.format != "bitsandbytes":
            return f"scheme {scheme.name!r} is integer codes; the bitsandbytes format stores scheme=nf4, fp4 or llm-int8"
        return None

    @torch.no_grad()
    def compress(self, mp, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        import bitsandbytes.functional as F

        options = self.scheme.options
        weight, bias = tensors["weight"], tensors.get("bias")
        if options.get("load_in_4bit"):
            packed, state = F.quantize_4bit(weight.float(), blocksize=mp.weight_args.group_size,
                                            compress_statistics=bool(options.get("bnb_4bit_use_double_quant")),
                                            quant_type=options.get("bnb_4bit_quant_type", "nf4"))
            out = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        else:
            codes, row_scale, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
            out = {"weight": codes, "SCB": row_scale}
        if bias is not None:
            out["bias"] = bias
        return out

    def parameter_names(self, mp, has_bias: bool) -> List[str]:
        probe = torch.zeros(1, mp.weight_args.group_size or 64)
        return list(self.compress(mp, {"weight": probe, **({"bias": torch.zeros(1)} if has_bias else {})}))

    def quantization_config(self, plan, backend: str):
        from hfquant_builtins.backends.bitsandbytes import bnb_config

        return bnb_config(plan.scheme, [])


@hookimpl
def register_formats(register):
    register("bitsandbytes", BitsAndBytesFormat)
