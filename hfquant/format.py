"""The `Format` protocol: how one quantized module is laid out on disk and declared in `quantization_config`.

A format is the contract with the engine that will read the folder, so it is separate from the algorithm that
chose the codes and from the kernels (backends) that run them. `compress` is a pure function of one module's
tensors — the same call serves a live module (in-memory pipeline) and tensors read from a checkpoint
(streaming), so both write the same bytes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Protocol, runtime_checkable

import torch

from .plan import ModulePlan, QuantPlan
from .scheme import QuantScheme


@runtime_checkable
class Format(Protocol):
    """Registered as a class; ``problem(scheme)`` is a static check made at config time, then the run constructs
    ``FormatClass(scheme)``."""

    @staticmethod
    def problem(scheme: QuantScheme) -> Optional[str]:
        """Why this format cannot store `scheme` (None when it can)."""

    def compress(self, mp: ModulePlan, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{"weight": float weight, "bias": optional}`` plus the plan's qparams/codes → ``{local name: tensor}``
        as saved under the module's prefix (e.g. ``weight_packed``, ``weight_scale``)."""

    def parameter_names(self, mp: ModulePlan, has_bias: bool) -> List[str]:
        """The local names `compress` returns, in the order they are written."""

    def quantization_config(self, plan: QuantPlan, backend: str):
        """What config.json's ``quantization_config`` declares (a dict or a transformers QuantizationConfig)."""


class ExportFormat:
    """Base of formats written by converting the checked hfquant folder (`source_format = "hfquant"`): `exporter` is
    a module with `export_folder(src, dst) -> summary` and `logits_without_hfquant(folder, ids, workdir)`."""

    source_format = "hfquant"
    exporter = None
    #: the dtype the consumer computes in, for the reference forward it is compared with (None: the model's own)
    reference_dtype = None

    def __init__(self, scheme) -> None:
        self.scheme = scheme

    def export(self, src: str, dst: str) -> dict:
        """Write `dst` from the hfquant folder `src` (the run's checked `model/`)."""
        return self.exporter.export_folder(src, dst)

    def logits_elsewhere(self, folder: str, input_ids: torch.Tensor, workdir: str) -> torch.Tensor:
        """The folder's logits as its consumer computes them, in a process without hfquant."""
        return self.exporter.logits_without_hfquant(folder, input_ids, workdir)

    def edit_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the export changes beyond the run's codes, applied to the reference model it is compared with
        (none by default)."""
        return model

    def reference_description(self) -> str:
        """What the consumer's logits were compared with (report.json `export.check.against`)."""
        return "hfquant's reference forward (float dequantization) of the same codes"
