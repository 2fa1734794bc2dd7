"""Read and write safetensors one tensor at a time, so memory holds one tensor, never a whole shard.

The reader maps one tensor's byte range at a time (`mmap`), copies it out and unmaps it, so the pages of a
checkpoint larger than RAM never pile up in the process's resident set. The writer lays the file out exactly
as `safetensors.torch.save_file` does (tensor order, header JSON, padding), so a streamed folder is
byte-identical to one written by `save_pretrained`; `tests/formats/test_safetensors_stream.py` checks this
against the library for every dtype.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
from ..errors import HfquantError

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# safetensors writes tensors by dtype, in this order, then by name (its Rust Dtype enum, descending).
FILE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
HEADER_ALIGNMENT = 8


class SafetensorsFormatError(HfquantError, ValueError):
    """A file that is not a readable safetensors file (truncated, bad header, unknown dtype)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code, e.g. "F16"
    shape: Tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return CODE_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str], int]:
    """(tensors by name, metadata, offset of the data section) from the file's header, without reading data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise SafetensorsFormatError(f"{path}: header length {length} is implausible; not a safetensors file?")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise SafetensorsFormatError(f"{path}: header is not JSON ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        if entry.get("dtype") not in CODE_DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which hfquant cannot read")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), begin, end)
    return tensors, metadata, 8 + length


class SafetensorsReader:
    """One safetensors file, read a tensor at a time through a short-lived memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tensors, self.metadata, self.data_start = read_header(path)

    def get(self, name: str) -> torch.Tensor:
        """A fresh tensor (owns its memory); the mapping is closed before returning."""
        info = self.tensors[name]
        nbytes = info.end - info.begin
        if nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        start = self.data_start + info.begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), start - aligned + nbytes, access=mmap.ACCESS_READ, offset=aligned)
            try:
                if hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_SEQUENTIAL)  # read ahead aggressively, drop behind
                with warnings.catch_warnings():  # read-only map: the view is only copied from, never written
                    warnings.simplefilter("ignore", UserWarning)
                    view = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start - aligned)
                out = view.clone()
                del view
            finally:
                mm.close()
            if hasattr(os, "posix_fadvise"):
                # These pages are read once: let the kernel reuse them now rather than evict other memory later
                # (a checkpoint larger than RAM would otherwise fill the page cache and slow every allocation).
                os.posix_fadvise(f.fileno(), start, nbytes, os.POSIX_FADV_DONTNEED)
        return out.view(info.torch_dtype).reshape(info.shape)


def _layout(entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], metadata: Optional[Dict[str, str]]):
    """Header bytes and each tensor's (begin, end), ordered as safetensors orders them."""
    rank = {code: i for i, code in enumerate(FILE_ORDER)}
    order = sorted(entries, key=lambda n: (rank[DTYPE_CODES[entries[n][0]]], n))
    header, offsets, position = {}, {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order:
        dtype, shape = entries[name]
        size = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            size *= d
        offsets[name] = (position, position + size)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, offsets, position


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensors are known by dtype and shape up front and arrive one at a time,
    in any order. `close()` refuses to finish a file with a tensor missing (the caller removes it)."""

    def __init__(self, path: str, entries: Dict[str, Tuple[torch.dtype, Iterable[int]]], metadata: Optional[Dict[str, str]] = None) -> None:
        self.path = path
        self.entries = {n: (dt, tuple(int(d) for d in shape)) for n, (dt, shape) in entries.items()}
        header, self.offsets, data_size = _layout(self.entries, metadata)
        self.data_start = len(header)
        self.pending = set(self.entries)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, self.data_start + data_size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                             f"the header promised {dtype}{shape}")
        if name not in self.pending:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        begin = self.data_start + self.offsets[name][0]
        view = memoryview(data)
        while view.nbytes:
            written = os.pwrite(self.fd, view, begin)
            view, begin = view[written:], begin + written
        self.pending.discard(name)

    def close(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        if self.pending:
            missing = sorted(self.pending)
            raise ValueError(f"{self.path}: {len(missing)} tensor(s) never written (e.g. {missing[0]!r}); the file is incomplete")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
