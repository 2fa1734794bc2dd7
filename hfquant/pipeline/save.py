"""Save a quantized model as a `save_pretrained` folder with a versioned `quantization_config`, and reload it."""

from __future__ import annotations

import shutil

import torch

from .. import __version__
from ..formats import HfQuantConfig, register_with_transformers
from .output import partial_dir, publish


def quantization_config(plan, backend: str) -> HfQuantConfig:
    return HfQuantConfig(
        scheme=plan.scheme.name,
        modules={name: mp.to_config() for name, mp in plan.modules.items()},
        ignore=list(plan.scheme.ignore),
        backend=backend,
        observer=plan.observer,
        hfquant_version=__version__,
    )


def save_quantized(model, tokenizer, plan, backend: str, output_dir: str, card: str = "", own_format: bool = True) -> str:
    """Write into a temporary folder, then rename it to `<output_dir>/model` (never a half-written `model/`).
    `own_format=False`: the backend's model already carries its own `quantization_config` (bitsandbytes)."""
    if own_format:
        model.config.quantization_config = quantization_config(plan, backend)
    tmp = partial_dir(output_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card:
            with open(f"{tmp}/README.md", "w", encoding="utf-8") as f:
                f.write(card)
        return publish(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_quantized(path: str, task: str = "causal-lm", **kwargs):
    """Reload a folder saved by hfquant (same as `AutoModelForCausalLM.from_pretrained` after `import hfquant`)."""
    from transformers import AutoModel, AutoModelForCausalLM

    register_with_transformers()
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    return auto.from_pretrained(path, **kwargs).eval()


@torch.no_grad()
def max_logit_difference(a, b, input_ids: torch.Tensor) -> float:
    """Largest absolute difference of the two models' outputs on `input_ids` (the reload check)."""
    out_a = a(input_ids=input_ids.to(next(a.parameters()).device))
    out_b = b(input_ids=input_ids.to(next(b.parameters()).device))
    ta = out_a.logits if hasattr(out_a, "logits") else out_a[0]
    tb = out_b.logits if hasattr(out_b, "logits") else out_b[0]
    return float((ta.float().cpu() - tb.float().cpu()).abs().max())
