"""`random`: calibration windows of uniformly random token ids — no text, no tokenizer.

For what needs layer inputs but not language: measuring memory and time of data-hungry algorithms at scale
(`scripts/bench_scale.py --algorithm gptq` on a synthetic, tokenizer-less checkpoint). Never a quality choice:
an algorithm fitted to noise fits nothing real, and the report names the dataset.
"""

from __future__ import annotations

import torch

from hfquant import hookimpl


class RandomTokens:
    """`token_windows(part, num_samples, seq_len, seed, vocab_size)` replaces texts + tokenizer."""

    def texts(self, part: str) -> list:
        raise NotImplementedError("the random dataset has token ids, not texts")

    @staticmethod
    def token_windows(part: str, num_samples: int, seq_len: int, seed: int, vocab_size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + (0 if part == "calibration" else 1))
        return torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)

    def describe(self) -> dict:
        return {"name": "random", "source": "uniform random token ids (no text: for memory/time measurements only)"}


@hookimpl
def register_datasets(register):
    register("random", RandomTokens)
