"""Registers hfquant's format with transformers, so `from_pretrained(folder)` reloads it after `import hfquant`.

The saved ``config.json`` carries ``quantization_config = {"quant_method": "hfquant", "format_version": 2,
"scheme": ..., "modules": {name: {"weights": QuantArgs, "input_activations": QuantArgs | null, "digest": ...}},
...}`` (the digest of each entry shows later edits; stored_check.py).
On load, the listed Linear modules are swapped for `QuantLinear` on the meta device before weights load.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..quant import QuantArgs
from .config_guard import register_guarded_config
from .qembedding import KIND as EMBEDDING_KIND
from .qembedding import QuantEmbedding
from .qlinear import QuantLinear
from .stored_check import StoredTensorMismatchError, check_stored_tensors, checked_modules, refuse_edited, with_digests

QUANT_METHOD = "hfquant"
# 2: config.json's model_type guards against loading without hfquant (config_guard.py);
# 3: modules may be embeddings (`kind: embedding`, scheme.embedding) — written only by folders that have one, so an
#    older hfquant asks to be upgraded instead of refusing the entry as a malformed Linear.
FORMAT_VERSION = 3


def written_version(modules: Dict[str, Dict[str, Any]]) -> int:
    """The oldest format version that can read these entries."""
    return 3 if any(entry.get("kind") == EMBEDDING_KIND for entry in modules.values()) else 2


class HfQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an hfquant folder (versioned; unknown future versions are refused)."""

    def __init__(
        self,
        scheme: str = "",
        modules: Optional[Dict[str, Dict[str, Any]]] = None,
        ignore: Optional[list] = None,
        backend: str = "fake",
        observer: Optional[str] = None,
        format_version: int = FORMAT_VERSION,
        hfquant_version: Optional[str] = None,
        base_model_type: Optional[str] = None,
        **kwargs,
    ) -> None:
        self.quant_method = QUANT_METHOD
        if isinstance(format_version, bool) or not isinstance(format_version, int):
            raise StoredTensorMismatchError(f"quantization_config.format_version in config.json must be an integer, "
                                            f"found {format_version!r}; restore config.json from the run that wrote "
                                            "the folder")
        if format_version > FORMAT_VERSION:
            raise StoredTensorMismatchError(
                f"this folder uses hfquant format_version {format_version}, newer than this hfquant understands "
                f"({FORMAT_VERSION}); upgrade hfquant (pip install -U hfquant)"
            )
        self.format_version = format_version
        self.scheme = scheme
        self.modules, self.edited_modules = checked_modules({} if modules is None else modules)
        self.ignore = list(ignore or [])
        self.backend = backend
        self.observer = observer
        self.hfquant_version = hfquant_version
        self.base_model_type = base_model_type

    def to_dict(self) -> Dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": written_version(self.modules),  # the oldest reader that understands these entries
            "hfquant_version": self.hfquant_version,
            "scheme": self.scheme,
            "backend": self.backend,
            "observer": self.observer,
            "ignore": self.ignore,
            "modules": with_digests(self.modules),
            **({"base_model_type": self.base_model_type} if self.base_model_type else {}),
        }


class HfQuantQuantizer(HfQuantizer):
    """Swaps the quantized Linear modules for `QuantLinear` before the saved codes and scales load into them."""

    requires_calibration = True  # only pre-quantized folders load; quantizing happens in the hfquant pipeline

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        replace_linears(model, self.quantization_config.modules, device="meta")
        check_stored_tensors(model, self.quantization_config.modules, checkpoint_files)
        refuse_edited(self.quantization_config.edited_modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.quantization_config.backend == "cpu":
            from .kernels import to_cpu_kernels

            to_cpu_kernels(model, {name: spec["tied_to"] for name, spec in self.quantization_config.modules.items()
                                   if spec.get("tied_to")})
        return model

    def update_dtype(self, dtype):
        return dtype

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """hfquant's modules are plain torch ops and aten kernels: `generate` may compile their decode steps
        (`hfquant.compile_decoding`; transformers' default for a quantizer is no)."""
        return True


def replace_linears(model: torch.nn.Module, modules: Dict[str, Dict[str, Any]], device=None) -> None:
    """Replace each named Linear by an empty `QuantLinear` with the saved per-module args."""
    for name, spec in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise StoredTensorMismatchError(f"quantization_config lists module {name!r}, which this model does not "
                                            "have; config.json was edited or belongs to another model") from None
        if isinstance(linear, (QuantLinear, QuantEmbedding)):
            continue
        if spec.get("kind") == EMBEDDING_KIND:
            model.set_submodule(name, _empty_embedding(name, linear, spec, device))
            continue
        if not isinstance(linear, torch.nn.Linear):
            raise StoredTensorMismatchError(f"quantization_config lists {name!r}, but the model has a "
                                            f"{type(linear).__name__} there")
        try:
            w_args = QuantArgs.from_dict(spec["weights"])
            a_args = QuantArgs.from_dict(spec["input_activations"]) if spec.get("input_activations") else None
        except (KeyError, TypeError, ValueError) as exc:
            raise StoredTensorMismatchError(f"quantization_config entry for {name!r} is malformed ({exc}); restore "
                                            "config.json from the run that wrote the folder") from None
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, w_args, a_args,
                        dtype=dtype, device=device if device is not None else linear.weight.device)
        model.set_submodule(name, q)


def _empty_embedding(name: str, embedding, spec: Dict[str, Any], device) -> QuantEmbedding:
    if not isinstance(embedding, torch.nn.Embedding):
        raise StoredTensorMismatchError(f"quantization_config lists {name!r} as an embedding, but the model has a "
                                        f"{type(embedding).__name__} there")
    try:
        args = QuantArgs.from_dict(spec["weights"])
        return QuantEmbedding(embedding.num_embeddings, embedding.embedding_dim, args, embedding.padding_idx,
                              dtype=embedding.weight.dtype, device=device if device is not None else embedding.weight.device)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoredTensorMismatchError(f"quantization_config entry for {name!r} is malformed ({exc}); restore "
                                        "config.json from the run that wrote the folder") from None


def register_with_transformers() -> None:
    """Idempotent: make transformers dispatch ``quant_method: hfquant`` to our config and quantizer."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HfQuantQuantizer)
    register_guarded_config()


register_with_transformers()  # importing this module is what registers it (hfquant/__init__.py)
