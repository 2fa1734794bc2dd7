"""`scheme.embedding=int8`: the input embedding as int8 codes with one scale per row, and its lm_head with it.

In a small model the tied embedding is a fifth of the weights (SmolLM2-135M: 28 M of 135 M), so with every
Linear at 4 bits the float32 table is most of what stays resident. A tied lm_head is the same matrix: it
becomes an 8-bit per-channel Linear over the same codes and scales (one scale per vocabulary row is one
scale per output channel), so one forward uses one set of numbers. An untied lm_head gets its own codes.

Steps: `prepare` (before the backend converts: adds the lm_head to the plan with its codes and builds the
`QuantEmbedding`), then `install` (after: swaps the embedding in; on the `cpu` backend the embedding and a
tied lm_head share one int8 tensor). The saved config lists the embedding with `kind: embedding` and unties
the two in `config.json` (transformers cannot tie modules that have no `weight`); `tied_to` records the tie
so a reload shares the codes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError
from ..formats.qembedding import KIND, QuantEmbedding, embedding_args
from ..plan import ModulePlan, QuantPlan


@dataclass
class EmbeddingPlan:
    name: str
    module: QuantEmbedding
    head: Optional[str]  # the lm_head quantized with it (None: no lm_head, or the scheme quantizes it already)
    tied: bool
    float_bytes: int


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None)


def check_embedding(model: torch.nn.Module, scheme) -> None:
    """Refuse `scheme.embedding` on a model without a plain input embedding, right after it loads."""
    if scheme.embedding is None:
        return
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if not isinstance(embedding, torch.nn.Embedding):
        raise ConfigError(f"scheme.embedding={scheme.embedding}: {type(model).__name__} has no torch.nn.Embedding input "
                          f"embedding to quantize (found {type(embedding).__name__}); set scheme.embedding=null")


def prepare(model: torch.nn.Module, scheme, plan: QuantPlan, round_scale=None) -> Optional[EmbeddingPlan]:
    """The quantized embedding, and the lm_head added to `plan` (codes chosen, so the backend just stores them)."""
    args = embedding_args(scheme.embedding)
    if args is None:
        return None
    embedding = model.get_input_embeddings()
    name = module_name(model, embedding)
    quantized = QuantEmbedding.from_embedding(embedding, args, round_scale)
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = module_name(model, head_module) if isinstance(head_module, torch.nn.Linear) else None
    tied = head is not None and head_module.weight.data_ptr() == embedding.weight.data_ptr()
    if head is not None and head in plan.modules:
        head, tied = None, False  # the scheme quantizes lm_head itself (not in scheme.ignore)
    if head is not None:
        if tied:
            qparams, codes = (quantized.weight_scale, quantized.weight_zero_point), quantized.codes()
        else:
            from ..formats.qlinear import QuantLinear

            alone = QuantLinear.from_linear(head_module, args, *_qparams(head_module.weight, args, round_scale))
            qparams, codes = (alone.weight_scale, alone.weight_zero_point), alone.codes()
        plan.modules[head] = ModulePlan(head, args, weight_qparams=qparams, weight_codes=codes,
                                        tied_to=name if tied else None)
    plan.embeddings[name] = {"weights": args.to_dict(), "input_activations": None, "kind": KIND,
                             **({"head": head} if head is not None else {})}
    float_bytes = embedding.weight.numel() * embedding.weight.element_size()
    return EmbeddingPlan(name, quantized, head, tied, float_bytes)


def _qparams(weight: torch.Tensor, args, round_scale):
    from ..quant import compute_qparams, min_max

    scale, zero_point = compute_qparams(*min_max(weight.detach(), args), args)
    return (round_scale(scale) if round_scale is not None else scale), zero_point


def convert_with_embedding(model: torch.nn.Module, scheme, plan: QuantPlan, backend: str, round_scale=None):
    """The backend's `convert`, with `scheme.embedding` applied around it: (quantized model, report entry or {})."""
    from .quantize import convert

    prepared = prepare(model, scheme, plan, round_scale)
    qmodel = convert(model, plan, backend)
    return qmodel, install(qmodel, prepared, backend)


def install(model: torch.nn.Module, prepared: Optional[EmbeddingPlan], backend: str) -> dict:
    """Swap the quantized embedding in (the backend's kind of it) and untie it in the config; the report entry."""
    if prepared is None:
        return {}
    module = prepared.module
    if backend == "cpu":
        from ..formats.kernels import embedding_kernel_for, share_tied_codes

        module = embedding_kernel_for(module)
        model.set_submodule(prepared.name, module)
        if prepared.tied:
            share_tied_codes(model, {prepared.head: prepared.name})
    else:
        model.set_submodule(prepared.name, module)
    return _entry(model, prepared.name, prepared.head, prepared.tied, prepared.module, prepared.float_bytes)


def _entry(model, name: str, head: Optional[str], tied: bool, module, float_bytes: int) -> dict:
    """The report's `quantization.embedding` (the same for a run and for its resume)."""
    stored = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return {"module": name, "head": head, "codes": "int8, one scale per row", "float_bytes": float_bytes,
            "bytes": stored,
            "lm_head": ("tied: the same codes and scales (stored again for transformers, shared in memory on the cpu "
                        "backend)" if tied else "int8 per output channel, its own codes" if head else
                        "quantized by the scheme" if _head_in(model) else "none")}


def _head_in(model) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def entry_of_folder(model: torch.nn.Module, modules: dict) -> dict:
    """The report entry `install` wrote, rebuilt from a reloaded folder's quantization_config (resume=true)."""
    name = next((n for n, entry in modules.items() if entry.get("kind") == KIND), None)
    if name is None:
        return {}
    module = model.get_submodule(name)
    head = modules[name].get("head")  # quantized with the embedding (absent: none, or the scheme quantized it)
    tied = bool(head) and modules.get(head, {}).get("tied_to") == name
    float_bytes = module.num_embeddings * module.embedding_dim * torch.finfo(module.dtype).bits // 8
    return _entry(model, name, head, tied, module, float_bytes)

