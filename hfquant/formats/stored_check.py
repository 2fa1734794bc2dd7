"""Before an hfquant folder's weights load: every quantized module's stored tensors must have the dtype and
shape its `quantization_config` entry implies. A hand-edited config (a flipped `signed`, another `num_bits`
or `group_size`) would otherwise load silently and compute garbage (top-1 agreement 0%). Edits the tensors
cannot reveal (activation settings, which have no stored tensor when dynamic) are caught by a digest of each
module's entry, written with the weights."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..errors import HfquantError, first_few
from .safetensors_stream import read_header

STORED_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


class StoredTensorMismatchError(HfquantError, ValueError):
    """The folder's tensors do not match its quantization_config."""


DIGEST_KEY = "digest"
RESTORE = "restore config.json from the run that wrote the folder (or re-run the quantization)"


def entry_digest(entry: dict) -> str:
    """Of a module's entry without its digest (canonical JSON: the values are ints, bools, strings, None)."""
    body = {k: v for k, v in entry.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_digests(modules: Dict[str, dict]) -> Dict[str, dict]:
    """The entries as saved: each with the digest of its content."""
    return {name: {**entry, DIGEST_KEY: entry_digest(entry)} for name, entry in modules.items()}


def checked_modules(modules) -> Tuple[Dict[str, dict], List[str]]:
    """A loaded `quantization_config.modules`, well-formed, without digests; and the names of the entries
    whose digest shows an edit (`refuse_edited`, after the tensor check, whose message is more precise).
    Entries written before digests existed have none: their tensors are still checked."""
    if not isinstance(modules, dict):
        raise StoredTensorMismatchError(f"quantization_config.modules in config.json must map module names to "
                                        f"entries, found {type(modules).__name__}; {RESTORE}")
    edited, plain = [], {}
    for name, entry in modules.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict):
            raise StoredTensorMismatchError(f"quantization_config entry for {name!r} is malformed (expected "
                                            f"{{'weights': {{...}}, 'input_activations': ...}}, found {entry!r:.120}); {RESTORE}")
        recorded = entry.get(DIGEST_KEY)
        plain[name] = {k: v for k, v in entry.items() if k != DIGEST_KEY}
        if recorded is not None and recorded != entry_digest(plain[name]):
            edited.append(name)
    return plain, edited


def refuse_edited(edited: List[str]) -> None:
    if edited:
        raise StoredTensorMismatchError(
            f"quantization_config in config.json was edited after the weights were written: the entries of "
            f"{first_few(edited, 4, ', ')} no longer match the digest recorded with them (stored codes cannot be "
            f"reinterpreted under other settings); {RESTORE}")


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
    unlisted = sorted({k[:-len(".weight_packed")] for k in stored if k.endswith(".weight_packed")} - set(modules))
    if unlisted:
        problems.append(f"{len(unlisted)} module(s) have quantized tensors in the file but no entry in "
                        f"quantization_config.modules: {first_few(unlisted, 3, ', ')}")
    for name in modules:
        expected = model.get_submodule(name).state_dict()
        for key in STORED_KEYS:
            full = f"{name}.{key}"
            have = stored.get(full)
            if key not in expected:
                if have is not None:
                    problems.append(f"{full} is in the file, the config implies none")
                continue
            want = (_code(expected[key].dtype), tuple(expected[key].shape))
            if have is None:
                problems.append(f"{full} is missing")
            elif have != want:
                problems.append(f"{full} is {have[0]}{list(have[1])} in the file, the config implies {want[0]}{list(want[1])}")
    if problems:
        shown = first_few(problems, 4)
        raise StoredTensorMismatchError(
            f"the quantized tensors do not match quantization_config in config.json ({shown}). The config was "
            f"edited or belongs to other weights: {RESTORE}")
