"""Model-written calibration windows shipped with hfquant, for the embedded demo model only.

Sampling 16 windows of 512 tokens from the model is the largest part of a first default run on a CPU (76–175 s on
two cores, docs/benchmarks.md), and it gives the same tokens on every machine measured (token sha256
ff58055f74e42e98 on three CPUs). So the windows the default run would sample are shipped as data: a run uses them
only when the model's files (weights, and the JSON beside them) are byte for byte the ones they were sampled from
(size, then sha256) and the request is the one they answer (count, length, seed, first tokens, the sampling
recipe's version; a float32 model on the CPU without autocast, checked by the caller). Anything else samples as
before. `scripts/ship_generated_windows.py` writes the file from a real sampling run (recording the library
versions it sampled with); a slow test re-samples the first 64 tokens of each window on the real model and
compares. For a GGUF the identity is the GGUF file: transformers' dequantization of it is part of "the same
recipe" (the versions in the file say which one made them).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import List, NamedTuple, Optional, Tuple

import torch

log = logging.getLogger("hfquant")

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
FORMAT = "hfquant-generated-windows-v1"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


class Shipped(NamedTuple):
    ids: torch.Tensor  # (count, seq_len) token ids
    provenance: str  # for the report and card: which weights, which file


def model_files(source: Optional[str]) -> List[str]:
    """What identifies a model here: its weight files (a GGUF or safetensors file itself, or those in a folder) and
    the JSON files beside them (config, generation config: they can change what sampling draws). [] for a Hub id."""
    if not source:
        return []
    if os.path.isfile(source):
        if not source.endswith(WEIGHT_SUFFIXES):
            return []
        folder, weights = os.path.dirname(source), [source]
    elif os.path.isdir(source):
        folder = source
        weights = sorted(os.path.join(source, n) for n in os.listdir(source) if n.endswith(WEIGHT_SUFFIXES))
    else:
        return []
    if not weights:
        return []
    return weights + sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json"))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(files: List[str], with_hashes: bool = True) -> List[Tuple[str, int, str]]:
    """[(file name, size, sha256 or "")] — what a shipped file records about the model it was sampled from."""
    return [(os.path.basename(p), os.path.getsize(p), file_sha256(p) if with_hashes else "") for p in files]


def request_metadata(count: int, seq_len: int, seed: int, first_tokens: torch.Tensor, recipe: str) -> dict:
    """The part of a shipped file's metadata that must equal the run's request."""
    return {"format": FORMAT, "count": str(count), "seq_len": str(seq_len), "seed": str(seed),
            "first_tokens": json.dumps([int(t) for t in first_tokens.reshape(-1)[:count].tolist()]), "recipe": recipe}


def token_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _candidates(directory: str, wanted: dict, sizes: list):
    """(path, metadata, recorded files, token ids) of each shipped file whose request and file names and sizes
    match; a file that cannot be read is skipped with a warning (it costs the sampling time, never wrong tokens)."""
    from safetensors import safe_open

    for path in sorted(glob.glob(os.path.join(directory, "generated-*.safetensors"))):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                recorded = json.loads(meta.get("model_files", "[]")) if meta.get("format") == FORMAT else []
                if not (all(meta.get(k) == v for k, v in wanted.items())
                        and [[n, size] for n, size, _ in recorded] == sizes):
                    continue
                ids = f.get_tensor("input_ids")
        except Exception as exc:
            log.warning("ignoring the shipped calibration windows %s (%s); sampling instead", path, exc)
            continue
        yield path, meta, recorded, ids


def find_shipped(source: Optional[str], count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
                 recipe: str, directory: Optional[str] = None) -> Optional[Shipped]:
    """The shipped windows sampled from exactly this model for exactly this request, or None. The model's files
    are hashed only when a shipped file's request and every file's name and size already match."""
    files = model_files(source)
    if not files:
        return None
    wanted = request_metadata(count, seq_len, seed, first_tokens, recipe)
    sizes = [[name, size] for name, size, _ in describe_files(files, with_hashes=False)]
    hashes = None
    for path, meta, recorded, ids in _candidates(directory or SHIPPED_DIR, wanted, sizes):
        if hashes is None:
            hashes = [file_sha256(p) for p in files]  # the user's files: an error here is theirs, not the shipped file's
        if [digest for _, _, digest in recorded] != hashes:
            continue
        if tuple(ids.shape) != (count, seq_len):
            log.warning("ignoring the shipped calibration windows %s: shape %s, expected %s", path, tuple(ids.shape),
                        (count, seq_len))
        elif token_digest(ids) != meta.get("token_sha256"):
            log.warning("ignoring the shipped calibration windows %s: their tokens do not match their recorded hash",
                        path)
        else:
            log.info("using the calibration windows this model wrote, shipped with hfquant (%s)", os.path.basename(path))
            weights = ", ".join(f"{name}, sha256 {digest[:16]}…" for name, _, digest in recorded
                                if name.endswith(WEIGHT_SUFFIXES))
            return Shipped(ids.to(torch.long), f"sampled once from the source model's weights ({weights}) by the same "
                                               f"recipe, shipped with hfquant ({os.path.basename(path)})")
    return None


def write_shipped(path: str, ids: torch.Tensor, source: str, seed: int, first_tokens: torch.Tensor,
                  recipe: str) -> dict:
    """Writes `ids` (sampled from the model whose files are at `source`) with what identifies them; the metadata."""
    from importlib.metadata import PackageNotFoundError, version

    from safetensors.torch import save_file

    files = model_files(source)
    if not files:
        raise ValueError(f"{source!r} holds no .gguf or .safetensors weights to identify the model by")
    versions = {}
    for package in ("torch", "transformers", "gguf", "hfquant"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    count, seq_len = ids.shape
    meta = dict(request_metadata(count, seq_len, seed, first_tokens, recipe),
                model_files=json.dumps(describe_files(files)), token_sha256=token_digest(ids),
                sampled_with=json.dumps(versions), made_by="scripts/ship_generated_windows.py")
    save_file({"input_ids": ids.to(torch.int32).contiguous()}, path, metadata=meta)
    return meta
