"""Before an hfquant folder's weights load: every quantized module's stored tensors must have the dtype and
shape its `quantization_config` entry implies. A hand-edited config (a flipped `signed`, another `num_bits`
or `group_size`) would otherwise load silently and compute garbage (top-1 agreement 0%)."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from ..errors import HfquantError, first_few
from .safetensors_stream import read_header

STORED_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


class StoredTensorMismatchError(HfquantError, ValueError):
    """The folder's tensors do not match its quantization_config."""


def stored_headers(checkpoint_files: Optional[Iterable[str]]) -> Dict[str, tuple]:
    """{tensor name: (dtype code, shape)} from the safetensors headers (no data read)."""
    found = {}
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors"):
            tensors, _, _ = read_header(str(path))
            found.update({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
    return found


def _code(dtype: torch.dtype) -> str:
    from .safetensors_stream import DTYPE_CODES

    return DTYPE_CODES[dtype]


def check_stored_tensors(model: torch.nn.Module, modules: Dict[str, dict], checkpoint_files) -> None:
    """Compare each listed module's expected quantized tensors (built empty on meta from the config) with
    the headers; raise naming the module, the tensor, what the config implies and what the file holds."""
    stored = stored_headers(checkpoint_files)
    if not stored:
        return
    problems = []
    for name in modules:
        expected = model.get_submodule(name).state_dict()
        for key in STORED_KEYS:
            if key not in expected:
                continue
            want = (_code(expected[key].dtype), tuple(expected[key].shape))
            full = f"{name}.{key}"
            have = stored.get(full)
            if have is None:
                problems.append(f"{full} is missing")
            elif have != want:
                problems.append(f"{full} is {have[0]}{list(have[1])} in the file, the config implies {want[0]}{list(want[1])}")
    if problems:
        shown = first_few(problems, 4)
        raise StoredTensorMismatchError(
            f"the quantized tensors do not match quantization_config in config.json ({shown}). The config was "
            "edited or belongs to other weights: restore config.json from the run that wrote the folder (or re-run "
            "the quantization)")
