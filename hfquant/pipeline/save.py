"""Save a quantized model as a `save_pretrained` folder with a versioned `quantization_config`, and reload it."""

from __future__ import annotations

import shutil

import torch

from .. import __version__
from ..formats import HfQuantConfig, register_with_transformers
from ..formats.config_guard import guard_config_json
from .faults import fault_point
from .output import partial_dir, publish


def quantization_config(plan, backend: str) -> HfQuantConfig:
    return HfQuantConfig(
        scheme=plan.scheme.name,
        modules={**{name: mp.to_config() for name, mp in plan.modules.items()}, **plan.embeddings},
        ignore=list(plan.scheme.ignore),
        backend=backend,
        observer=plan.observer,
        hfquant_version=__version__,
    )


def save_quantized(model, tokenizer, plan, backend: str, output_dir: str, card: str = "", own_format: bool = True,
                   max_shard_size="5GB") -> str:
    """Write into a temporary folder, then rename it to `<output_dir>/model` (never a half-written `model/`).
    `own_format=False`: the backend's model already carries its own `quantization_config` (bitsandbytes)."""
    if own_format:
        model.config.quantization_config = quantization_config(plan, backend)
        untie_replaced(model)
    tmp = partial_dir(output_dir)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if own_format:
            guard_config_json(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card:
            with open(f"{tmp}/README.md", "w", encoding="utf-8") as f:
                f.write(card)
        fault_point("save:written")
        return publish(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def untie_replaced(model) -> None:
    """A tied input embedding / lm_head pair of which one was replaced by a quantized module is saved untied:
    transformers ties by setting one module's `weight` to the other's, and quantized modules have none (the load
    would fail). Both modules' tensors are in the folder; a tie hfquant keeps is recorded as `tied_to`."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if head is not None and not (isinstance(embedding, torch.nn.Embedding) and isinstance(head, torch.nn.Linear)):
        model.config.tie_word_embeddings = False


def load_quantized(path: str, task: str = "causal-lm", **kwargs):
    """Reload a folder saved by hfquant (same as `AutoModelForCausalLM.from_pretrained` after `import hfquant`)."""
    from transformers import AutoModel, AutoModelForCausalLM

    register_with_transformers()
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    return auto.from_pretrained(path, **kwargs).eval()


REFERENCE_TOP_K = 5


@torch.no_grad()
def model_output(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, or the last hidden state of an encoder, for the first sequence, on CPU."""
    out = model(input_ids=input_ids.to(next(model.parameters()).device))
    main = out.logits if hasattr(out, "logits") else out[0]
    return main[0].float().cpu()


def reload_check(quantized, reloaded, input_ids: torch.Tensor) -> dict:
    """Max |Δ| between the in-memory and reloaded models, plus a small fingerprint (top-k logits) of the
    in-memory output, kept in report.json so a resumed run can re-check the folder before pushing."""
    a, b = model_output(quantized, input_ids), model_output(reloaded, input_ids)
    diff = float((a - b).abs().max())
    values, indices = a.topk(min(REFERENCE_TOP_K, a.shape[-1]), dim=-1)
    reference = {"input_ids": input_ids[0].tolist(), "top_values": values.tolist(), "top_indices": indices.tolist()}
    return {"max_abs_logit_difference": diff, "tokens": int(input_ids.numel()), "ok": diff <= 1e-4, "reference": reference}


def compare_with_reference(model, reference: dict) -> dict:
    """The reload check of a resumed run: the folder's output against the fingerprint recorded when it was written."""
    out = model_output(model, torch.tensor([reference["input_ids"]]))
    diff = float((out.gather(1, torch.tensor(reference["top_indices"])) - torch.tensor(reference["top_values"])).abs().max())
    return {"max_abs_logit_difference": diff, "tokens": len(reference["input_ids"]), "ok": diff <= 1e-4,
            "against": "the logits recorded when the folder was written", "reference": reference}
