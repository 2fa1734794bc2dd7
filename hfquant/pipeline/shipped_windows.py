"""Model-written calibration windows shipped with hfquant, for the embedded demo model only.

Sampling 16 windows of 512 tokens from the model is the largest part of a first default run on a CPU (76–175 s on
two cores, docs/benchmarks.md), and it gives the same tokens on every machine measured (token sha256
ff58055f74e42e98 on three CPUs). So the windows the default run would sample are shipped as data: a run uses them
only when the model's weight files are byte for byte the ones they were sampled from (size, then sha256) and the
request is the one they answer (count, length, seed, first tokens, float32 without autocast, the sampling recipe's
version). Anything else samples as before. `scripts/ship_generated_windows.py` writes the file from a real
sampling run; a slow test samples the first tokens again and compares.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import List, Optional, Tuple

import torch

log = logging.getLogger("hfquant")

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
FORMAT = "hfquant-generated-windows-v1"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def weight_files(source: Optional[str]) -> List[str]:
    """The files that hold a model's weights: a GGUF or safetensors file itself, or those in a folder."""
    if not source:
        return []
    if os.path.isfile(source):
        return [source] if source.endswith(WEIGHT_SUFFIXES) else []
    if os.path.isdir(source):
        return sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(WEIGHT_SUFFIXES))
    return []  # a Hub id: no local files to identify


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_weights(files: List[str], with_hashes: bool = True) -> List[Tuple[str, int, str]]:
    """[(file name, size, sha256 or "")] — what a shipped file records about the model it was sampled from."""
    return [(os.path.basename(p), os.path.getsize(p), file_sha256(p) if with_hashes else "") for p in files]


def request_metadata(count: int, seq_len: int, seed: int, first_tokens: torch.Tensor, recipe: str) -> dict:
    """The part of a shipped file's metadata that must equal the run's request."""
    return {"format": FORMAT, "count": str(count), "seq_len": str(seq_len), "seed": str(seed),
            "first_tokens": json.dumps([int(t) for t in first_tokens.reshape(-1)[:count].tolist()]), "recipe": recipe}


def token_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def find_shipped(source: Optional[str], count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
                 recipe: str, directory: Optional[str] = None) -> Optional[torch.Tensor]:
    """The shipped (count, seq_len) windows sampled from exactly this model for exactly this request, or None.
    Weight files are hashed only when a shipped file's request and every file's name and size already match."""
    from safetensors import safe_open

    files = weight_files(source)
    if not files:
        return None
    wanted = request_metadata(count, seq_len, seed, first_tokens, recipe)
    sizes = [[name, size] for name, size, _ in describe_weights(files, with_hashes=False)]
    for path in sorted(glob.glob(os.path.join(directory or SHIPPED_DIR, "generated-*.safetensors"))):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if any(meta.get(key) != value for key, value in wanted.items()):
                    continue
                recorded = json.loads(meta.get("model_files", "[]"))
                if [[name, size] for name, size, _ in recorded] != sizes:
                    continue
                if [digest for _, _, digest in recorded] != [file_sha256(p) for p in files]:
                    continue
                ids = f.get_tensor("input_ids")
        except Exception as exc:  # a damaged shipped file costs the sampling time, never wrong tokens
            log.warning("ignoring the shipped calibration windows %s (%s); sampling instead", path, exc)
            continue
        if tuple(ids.shape) == (count, seq_len) and token_digest(ids) == meta.get("token_sha256"):
            log.info("using the calibration windows this model wrote, shipped with hfquant (%s)", os.path.basename(path))
            return ids.to(torch.long)
        log.warning("ignoring the shipped calibration windows %s: their tokens do not match their recorded hash", path)
    return None


def write_shipped(path: str, ids: torch.Tensor, source: str, seed: int, first_tokens: torch.Tensor,
                  recipe: str) -> dict:
    """Writes `ids` (sampled from the model whose weights are at `source`) with what identifies them; the metadata."""
    from safetensors.torch import save_file

    files = weight_files(source)
    if not files:
        raise ValueError(f"{source!r} holds no .gguf or .safetensors weights to identify the model by")
    count, seq_len = ids.shape
    meta = dict(request_metadata(count, seq_len, seed, first_tokens, recipe),
                model_files=json.dumps(describe_weights(files)), token_sha256=token_digest(ids),
                made_by="scripts/ship_generated_windows.py")
    save_file({"input_ids": ids.to(torch.int32).contiguous()}, path, metadata=meta)
    return meta
