"""Calibration windows the model writes itself: text in the model's own distribution, not one narrow domain.

Error-correcting algorithms fit the layer inputs they see; calibrated on one domain (Python documentation)
they win there and lose on everything else. Mixing windows sampled from the model (seeded, temperature 1, the
first token drawn from the dataset's own calibration windows) with the dataset's windows keeps the statistics
general. Sampling runs once per (model, seed, size): the windows are cached next to the baseline metrics, so a
sweep and a re-run calibrate on the same tokens (whose hash the report and card record).

Sampling under bfloat16 autocast (`autocast_dtype`) is a benchmark option only: on a CPU with bf16 dot products it
is faster for the first 64 tokens but slower over a whole 512-token window (134.7 vs 123.1 ms per step at batch 16,
docs/benchmarks.md), so runs sample in the model's own dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Optional, Tuple

import torch

from .data import Windows
from .evaluate import cache_dir
from .load import float_dtype
from .shipped_windows import Shipped, find_shipped

log = logging.getLogger("hfquant")

RECIPE = "generated-v2"  # bump when sampling changes: it keys the cache and the windows shipped with hfquant


def _cache_path(fingerprint: str, count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
                model_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> str:
    """Keyed by the model's dtype and any autocast dtype too (the fingerprint names the checkpoint, not how it was
    loaded); a float32 model without autocast keeps the key the caches already written have."""
    extra = ([] if model_dtype == torch.float32 else [f"model {model_dtype}"]) + (
        [] if autocast_dtype is None else [str(autocast_dtype)])
    blob = json.dumps([fingerprint, count, seq_len, seed, first_tokens.tolist(), RECIPE] + extra)
    return os.path.join(cache_dir(), "generated-" + hashlib.sha256(blob.encode()).hexdigest()[:24] + ".pt")


@torch.no_grad()
def generate_windows(model, count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
                     autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(count, seq_len) token ids sampled from `model` (temperature 1, no top-k/top-p, end-of-text not allowed
    to stop a window early), each sequence starting from one of `first_tokens`; seeded, global RNG (CUDA's too)
    untouched. `autocast_dtype` samples a float32 model under autocast to that lower precision."""
    device = next(model.parameters()).device
    autocast = contextlib.nullcontext()
    if autocast_dtype is not None:
        if float_dtype(model) != torch.float32 or autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast samples a float32 model in bfloat16 or float16; this model is "
                             f"{float_dtype(model)} and {autocast_dtype} was asked for")
        autocast = torch.autocast(device.type, dtype=autocast_dtype)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        torch.manual_seed(seed)
        ids = model.generate(first_tokens[:count].reshape(count, 1).to(device), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                             attention_mask=torch.ones(count, 1, dtype=torch.long, device=device),
                             streamer=StepProgress(seq_len - 1))
    return ids[:, :seq_len].cpu()


class StepProgress:
    """A progress bar over the sampled steps, fed by `generate` as a streamer (it reads no tokens, so sampling is
    unchanged): a first run on a CPU samples for one to three minutes, which would otherwise pass in silence."""

    def __init__(self, steps: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, desc="sample calibration text", unit="token", leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:  # the prompt first, then the tokens of one step per call
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def first_tokens_for(dataset_windows: Windows, count: int, seed: int) -> torch.Tensor:
    """The tokens the sampled windows start from: `count` drawn (seeded) from the dataset's calibration windows."""
    ids = dataset_windows.input_ids
    return ids.reshape(-1)[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))[:count]]


def _shipped(model, weights_source: Optional[str], count: int, seq_len: int, seed: int, first_tokens: torch.Tensor,
             autocast_dtype: Optional[torch.dtype]) -> Optional[Shipped]:
    """Shipped windows where they are what this run would sample: a float32 model wholly on the CPU (where they
    were sampled; CUDA's generator draws other tokens), no autocast. A failed lookup only costs the sampling."""
    if autocast_dtype is not None or float_dtype(model) != torch.float32 or any(
            p.device.type != "cpu" for p in model.parameters()):
        return None
    try:
        return find_shipped(weights_source, count, seq_len, seed, first_tokens, RECIPE)
    except Exception as exc:  # e.g. a model file unreadable while hashing it
        log.warning("could not match the model against hfquant's shipped calibration windows (%s); sampling instead",
                    exc)
        return None


def calibration_request(spec, tokenizer) -> Tuple[Windows, torch.Tensor]:
    """(the config's dataset calibration windows, the first tokens its model-written windows start from) — what a
    run samples from, for the shipping script and its test."""
    from . import data

    windows = data.windows(tokenizer, spec, "calibration")
    return windows, first_tokens_for(windows, spec.calibration.generated, spec.calibration.seed)


def with_generated(model, fingerprint: str, dataset_windows: Windows, count: int, seed: int,
                   autocast_dtype: Optional[torch.dtype] = None, weights_source: Optional[str] = None) -> Windows:
    """`dataset_windows` followed by `count` windows sampled from `model` (cached), protocol updated. With the
    model's `weights_source` (a folder or weights file), windows shipped with hfquant for exactly those weights and
    this request stand in for sampling (pipeline/shipped_windows.py)."""
    if count <= 0:
        return dataset_windows
    computes_in = autocast_dtype or float_dtype(model)
    seq_len = dataset_windows.input_ids.shape[1]
    first_tokens = first_tokens_for(dataset_windows, count, seed)
    path = _cache_path(fingerprint, count, seq_len, seed, first_tokens, float_dtype(model), autocast_dtype)
    generated = None
    if os.path.isfile(path):
        try:
            generated = torch.load(path, weights_only=True)
        except Exception:  # a torn cache file is regenerated (or replaced by shipped windows), never trusted
            generated = None
            with contextlib.suppress(OSError):
                os.remove(path)
    shipped = None  # looked up again on each run (a hash of the model's files), never copied into the cache
    if generated is None or tuple(generated.shape) != (count, seq_len):
        shipped = _shipped(model, weights_source, count, seq_len, seed, first_tokens, autocast_dtype)
        generated = shipped.ids if shipped else None
    if generated is None or tuple(generated.shape) != (count, seq_len):
        log.info("sampling %d calibration windows of %d tokens from the model in %s (cached for the next run)", count,
                 seq_len, str(computes_in).replace("torch.", ""))
        generated = generate_windows(model, count, seq_len, seed, first_tokens, autocast_dtype)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(generated, tmp)
        os.replace(tmp, path)
    ids = torch.cat([dataset_windows.input_ids, generated.to(dataset_windows.input_ids.dtype)])
    mixed = Windows(ids, dict(dataset_windows.protocol), dataset_windows.score_from)
    mixed.protocol.update(num_samples=len(ids), tokens=int(ids.numel()),
                          generated={"windows": count, "seed": seed, "sampling": "temperature 1, first token from the "
                                     "dataset windows, model's own continuation",
                                     "computed_in": str(computes_in).replace("torch.", ""),
                                     **({"shipped": shipped.provenance} if shipped else {})},
                          token_sha256=mixed.token_hash)
    return mixed
