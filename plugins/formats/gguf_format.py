"""`gguf`: the file llama.cpp, Ollama and LM Studio read (`hfquant.formats.gguf_export`): Q4_0 for `w4a16`, Q8_0
for `w8a16`. Scales are rounded to float16 before the codes are chosen, so the file holds hfquant's numbers; the
run proves the file with transformers' GGUF loader in a process where `import hfquant` fails."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from hfquant import hookimpl
from hfquant.format import ExportFormat
from hfquant.formats import gguf_export as gg
from hfquant_builtins.formats.compressed_tensors_format import FormatShapeError, refuse_non_causal


class GgufFormat(ExportFormat):
    """Option `embedding`: `float` (the model's dtype, default) or `q8_0` — the token embedding (and an untied
    lm_head) written as Q8_0 blocks, round-to-nearest per 32 values, so the file is about half the size; the
    export check compares against the reference with the same Q8_0 embedding."""

    name = gg.FORMAT_NAME
    exporter = gg
    reference_dtype = torch.float32  # transformers dequantizes GGUF to float32 (BF16 / F16 tensors upcast exactly)

    def __init__(self, scheme, embedding: str = "float") -> None:
        super().__init__(scheme)
        if embedding not in gg.EMBEDDING_TYPES:
            raise ValueError(f"embedding={embedding!r} is unknown; allowed: {', '.join(gg.EMBEDDING_TYPES)}")
        self.embedding = embedding

    def export(self, src: str, dst: str) -> dict:
        return gg.export_folder(src, dst, embedding=self.embedding)

    def edit_reference(self, model):
        return gg.quantize_embeddings(model) if self.embedding == "q8_0" else model

    def round_scale_for(self, dtype):
        """ggml blocks hold float16 `d` (and Q4_1 a float16 offset), whatever the model's dtype."""
        return gg.round_scale if self.scheme.weights.symmetric else gg.round_scale_q4_1

    @staticmethod
    def problem(scheme) -> Optional[str]:
        return gg.scheme_problem(scheme)

    @staticmethod
    def check_model(model, scheme, targets: Dict[str, torch.nn.Module]) -> None:
        refuse_non_causal(model, "gguf")
        model_type = getattr(model.config, "model_type", None)
        if model_type not in gg.ARCHITECTURES:
            raise FormatShapeError(f"format=gguf writes the Llama family ({', '.join(sorted(gg.ARCHITECTURES))}); "
                                   f"{type(model).__name__} ({model_type!r}) is not written yet — use format=auto")
        problems = gg.shape_problems({n: (m.out_features, m.in_features) for n, m in targets.items()})
        if problems:
            raise FormatShapeError(f"format=gguf cannot store this model: {'; '.join(problems[:3])} (ggml blocks "
                                   "hold 32 columns); use format=auto")

    def compress(self, mp, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One module as its ggml block bytes (GGUF stores a module's weight as one tensor of blocks)."""
        scale, zero_point = mp.weight_qparams
        data, _ = gg.ggml_blocks(mp.weight_codes, scale, zero_point, mp.weight_args)
        out = {"weight": torch.from_numpy(data.copy())}
        if tensors.get("bias") is not None:
            out["bias"] = tensors["bias"]
        return out

    def parameter_names(self, mp, has_bias: bool) -> List[str]:
        return ["weight", "bias"] if has_bias else ["weight"]

    def quantization_config(self, plan, backend: str):
        return {"quant_method": "gguf", "ggml_type": "Q8_0" if plan.scheme.weights.num_bits == 8 else "Q4_0"}


@hookimpl
def register_formats(register):
    register(gg.FORMAT_NAME, GgufFormat)
