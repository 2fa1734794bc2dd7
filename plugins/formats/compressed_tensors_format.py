"""`compressed-tensors`: the format transformers and vLLM read (`hfquant.formats.compressed_tensors`). A run with
`format=compressed-tensors` quantizes and checks as usual, then re-lays the saved codes out in this format (no
second quantization) and proves the folder with plain transformers in a process where `import hfquant` fails."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from hfquant import hookimpl
from hfquant.errors import HfquantError
from hfquant.format import ExportFormat
from hfquant.formats import compressed_tensors as ct
from hfquant_builtins.formats.hfquant_format import HfquantFormat


class FormatShapeError(HfquantError, ValueError):
    """The loaded model has Linears the format's consumers cannot run with this scheme."""


def refuse_non_causal(model, fmt: str) -> None:
    """Export formats prove a folder with a causal LM's logits, built from config.json alone (no remote code)."""
    if not type(model).__name__.endswith("ForCausalLM"):
        raise FormatShapeError(f"format={fmt} exports causal language models; {type(model).__name__} is not one "
                               "(use format=auto)")
    if getattr(model.config, "auto_map", None):
        raise FormatShapeError(f"format={fmt} rebuilds the model from config.json without remote code; this model "
                               "needs trust_remote_code (use format=auto)")


class CompressedTensorsFormat(ExportFormat):
    """Written by converting the hfquant folder a run saves: every backend that keeps hfquant's format feeds it."""

    name = ct.FORMAT_NAME
    exporter = ct

    @staticmethod
    def round_scale_for(dtype):
        """Its loaders allocate scales in the model's dtype: bf16 / fp16 models get scales rounded before codes."""
        return ct.round_scale_to(dtype)

    @staticmethod
    def problem(scheme) -> Optional[str]:
        import importlib.util

        if importlib.util.find_spec("compressed_tensors") is None:  # checked before anything loads
            return ("its reload check loads the folder with transformers + compressed-tensors, which is not installed: "
                    "pip install 'hfquant[formats]' (or compressed-tensors)")
        return ct.scheme_problem(scheme)

    @staticmethod
    def check_model(model, scheme, targets: Dict[str, torch.nn.Module]) -> None:
        """Right after loading: refuse Linears whose shapes its loaders cannot run, naming them and what works."""
        refuse_non_causal(model, "compressed-tensors")
        shapes = {name: (m.out_features, m.in_features) for name, m in targets.items()}
        problems = ct.shape_problems(shapes, scheme.weights)
        if problems:
            hint = ct.divisors_hint(shapes.values(), scheme.weights.group_size or 0) \
                if scheme.weights.strategy == "group" else "use scheme=w4a16 (symmetric) or another format"
            raise FormatShapeError(f"format=compressed-tensors cannot store this model with scheme "
                                   f"{scheme.name!r}: {'; '.join(problems[:3])}"
                                   f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. "
                                   f"{hint}, or use format=auto (hfquant's format keeps ragged groups)")

    def edit_reference(self, model):
        """w8a8: transformers quantizes activations its own way (absmax/127.5); compare with that."""
        return ct.ct_activation_reference(model)

    def reference_description(self) -> str:
        if self.scheme.input_activations is None:
            return super().reference_description()
        return ("hfquant's reference forward of the same codes, activations rounded per token as transformers' "
                "compressed-tensors forward rounds them (absmax/127.5; vLLM and hfquant use absmax/127)")

    def compress(self, mp, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        stored = HfquantFormat.compress(mp, tensors)
        weight = tensors["weight"]
        return ct.module_tensors(mp.weight_args, mp.input_args, stored, weight.shape[1], weight.dtype)

    def parameter_names(self, mp, has_bias: bool) -> List[str]:
        if mp.input_args is not None:
            return ["weight", "weight_scale"] + (["bias"] if has_bias else [])
        names = ["weight_packed", "weight_scale", "weight_shape"]
        if not mp.weight_args.symmetric:
            names.append("weight_zero_point")
        return names + (["bias"] if has_bias else [])

    def quantization_config(self, plan, backend: str):
        sample = next(iter(plan.modules.values()))
        return ct.quantization_config(sample.weight_args, sample.input_args, list(plan.scheme.ignore))


@hookimpl
def register_formats(register):
    register(ct.FORMAT_NAME, CompressedTensorsFormat)
