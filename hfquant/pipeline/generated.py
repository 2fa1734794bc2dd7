"""Calibration windows the model writes itself: text in the model's own distribution, not one narrow domain.

Error-correcting algorithms fit the layer inputs they see; calibrated on one domain (Python documentation)
they win there and lose on everything else. Mixing windows sampled from the model (seeded, temperature 1, the
first token drawn from the dataset's own calibration windows) with the dataset's windows keeps the statistics
general. Sampling runs once per (model, seed, size): the windows are cached next to the baseline metrics, so a
sweep and a re-run calibrate on the same tokens (whose hash the report and card record).

Sampling is the largest one-time cost of a first run on CPU (a batch of windows, one token at a time). A float32
model on a CPU with bf16 dot products (AVX512-BF16, AMX) samples under bfloat16 autocast by default: 113 → 81 ms
per step at batch 16 on the embedded model. The text then differs from a float32 sampler's (as it would between
any two numerics), so `generated_dtype=float32` is there for runs that must match across CPU kinds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import contextlib

import torch

from .data import Windows
from .evaluate import cache_dir

log = logging.getLogger("hfquant")


def sampling_dtype(model, requested: str = "auto") -> torch.dtype:
    """What sampling computes in: `requested`, or (auto) bfloat16 for a float32 model on a CPU with bf16 dot
    products and the model's own dtype everywhere else."""
    from hfquant.formats.kernels import bf16_gemm_is_fast

    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype == torch.float32 and bf16_gemm_is_fast():
        return torch.bfloat16
    return param.dtype


def _cache_path(fingerprint: str, count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
                dtype: torch.dtype) -> str:
    blob = json.dumps([fingerprint, count, seq_len, seed, first_tokens.tolist(), "generated-v2"]
                      + ([] if dtype == torch.float32 else [str(dtype)]))  # float32 keeps the caches already written
    return os.path.join(cache_dir(), "generated-" + hashlib.sha256(blob.encode()).hexdigest()[:24] + ".pt")


@torch.no_grad()
def generate_windows(model, count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(count, seq_len) token ids sampled from `model` (temperature 1, no top-k/top-p, end-of-text not allowed
    to stop a window early), each sequence starting from one of `first_tokens`; seeded, global RNG untouched.
    A `dtype` other than the model's runs the sampling under autocast to it."""
    param = next(model.parameters())
    device = param.device
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != param.dtype else contextlib.nullcontext())
    with torch.random.fork_rng(devices=[]), autocast:
        torch.manual_seed(seed)
        ids = model.generate(first_tokens[:count].reshape(count, 1).to(device), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                             attention_mask=torch.ones(count, 1, dtype=torch.long, device=device))
    return ids[:, :seq_len].cpu()


def with_generated(model, fingerprint: str, dataset_windows: Windows, count: int, seed: int,
                   dtype: str = "auto") -> Windows:
    """`dataset_windows` followed by `count` windows sampled from `model` (cached), protocol updated."""
    if count <= 0:
        return dataset_windows
    computes_in = sampling_dtype(model, dtype)
    seq_len = dataset_windows.input_ids.shape[1]
    pick = torch.randperm(dataset_windows.input_ids.numel(), generator=torch.Generator().manual_seed(seed))[:count]
    first_tokens = dataset_windows.input_ids.reshape(-1)[pick]
    path = _cache_path(fingerprint, count, seq_len, seed, first_tokens, computes_in)
    generated = None
    if os.path.isfile(path):
        try:
            generated = torch.load(path, weights_only=True)
        except Exception:  # a torn cache file is regenerated, never trusted
            generated = None
    if generated is None or tuple(generated.shape) != (count, seq_len):
        log.info("sampling %d calibration windows of %d tokens from the model in %s (cached for the next run)", count,
                 seq_len, str(computes_in).replace("torch.", ""))
        generated = generate_windows(model, count, seq_len, seed, first_tokens, computes_in)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(generated, tmp)
        os.replace(tmp, path)
    ids = torch.cat([dataset_windows.input_ids, generated.to(dataset_windows.input_ids.dtype)])
    mixed = Windows(ids, dict(dataset_windows.protocol), dataset_windows.score_from)
    mixed.protocol.update(num_samples=len(ids), tokens=int(ids.numel()),
                          generated={"windows": count, "seed": seed, "sampling": "temperature 1, first token from the "
                                     "dataset windows, model's own continuation",
                                     "computed_in": str(computes_in).replace("torch.", "")},
                          token_sha256=mixed.token_hash)
    return mixed
