"""Pickle (`torch.save`, `.bin`) checkpoints for the streaming pipeline, under the in-memory loader's rule: read
only with `model.allow_pickle=true`, and then with `weights_only=True` (plain tensors; no code runs) and
`mmap=True` (a tensor's bytes are read from disk when it is used), one file open at a time.

Streaming decides from the files before any output is written: a checkpoint it cannot read (torch's legacy
non-zip format cannot be memory-mapped) sends `pipeline=auto` to the in-memory loader, which can.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import HfquantError

PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin")  # Trainer's other pickles


class PickleCheckpointError(HfquantError, ValueError):
    """A pickle checkpoint the streaming pipeline cannot read; says why and what to run instead."""


def refusal(folder: str, files: List[str]) -> str:
    """The loader's own rule, worded for streaming: pickle runs code when loaded, so it needs consent."""
    return (f"{folder!r} has only pickle weights ({', '.join(files)}), which can run arbitrary code when loaded; "
            "convert them to safetensors, or set model.allow_pickle=true if you trust the source (they are then read "
            "with torch.load(weights_only=True, mmap=True), one file at a time)")


def weight_files(folder: str) -> Dict[str, str]:
    """Tensor name → `.bin` file, from `pytorch_model.bin.index.json`, `pytorch_model.bin`, or the one `.bin`
    file there is; {} when the folder holds no pickle weights."""
    index = os.path.join(folder, PICKLE_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    bins = candidates(folder)
    if not bins:
        return {}
    if len(bins) > 1 and PICKLE_NAME not in bins:
        raise PickleCheckpointError(f"{folder!r} has several pickle files ({', '.join(bins)}) and no {PICKLE_INDEX_NAME} "
                                    "saying which tensor is where; add the index, or convert the checkpoint to safetensors")
    path = os.path.join(folder, PICKLE_NAME if PICKLE_NAME in bins else bins[0])
    return {name: path for name in PickleReader(path, OneOpen()).tensors}


def candidates(folder: str) -> List[str]:
    """The `.bin` files that may hold weights (Trainer's own pickles excluded)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".bin") and f not in NOT_WEIGHTS)


def legacy_problem(folder: str) -> Optional[str]:
    """Why `folder`'s pickle weights cannot be streamed (torch's legacy format cannot be memory-mapped), or None."""
    legacy = [f for f in candidates(folder) if not zipfile.is_zipfile(os.path.join(folder, f))]
    if not legacy:
        return None
    return (f"the pickle checkpoint {legacy[0]!r} is in torch's legacy format (saved before torch 1.6 or with "
            "_use_new_zipfile_serialization=False), which cannot be memory-mapped tensor by tensor; convert it to "
            "safetensors to stream it")


@dataclass(frozen=True)
class PickleTensorInfo:
    torch_dtype: torch.dtype
    shape: Tuple[int, ...]


class OneOpen:
    """The one pickle file whose mapping is open: opening another closes it, so memory holds one file's pages."""

    def __init__(self) -> None:
        self.path: Optional[str] = None
        self.state: Optional[Dict[str, torch.Tensor]] = None

    def open(self, path: str) -> Dict[str, torch.Tensor]:
        if path != self.path:
            self.path, self.state = None, None  # drop the previous mapping before mapping the next file
            self.state, self.path = load_state(path), path
        return self.state


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """`path`'s state dict, memory-mapped, plain tensors only; a clear error for anything else."""
    if not zipfile.is_zipfile(path):
        raise PickleCheckpointError(f"{path!r}: {legacy_problem(os.path.dirname(path)) or 'not a torch.save zip file'}; "
                                    "use pipeline=in_memory")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PickleCheckpointError(f"{path!r} is not a plain state dict that torch.load(weights_only=True) can read "
                                    f"({type(exc).__name__}: {first}); convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PickleCheckpointError(f"{path!r} does not hold a state dict (name → tensor); convert it to safetensors")
    return state


class PickleReader:
    """The same interface as `SafetensorsReader` (`tensors`, `get`) over one `.bin` file."""

    def __init__(self, path: str, slot: OneOpen) -> None:
        self.path, self.slot = path, slot
        self.tensors = {k: PickleTensorInfo(v.dtype, tuple(v.shape)) for k, v in slot.open(path).items()}

    def get(self, name: str) -> torch.Tensor:
        return self.slot.open(self.path)[name]
