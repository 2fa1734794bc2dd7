"""Token windows for calibration (random, seeded) and evaluation (consecutive, pinned protocol).

Each part's texts are joined with a blank line and tokenized once, without special tokens, into one stream;
windows are cut from that stream. Calibration and evaluation come from disjoint parts of the dataset.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional

import torch
from ..errors import HfquantError


class DataError(HfquantError, ValueError):
    """Not enough data for what was asked; says how many tokens there are."""


@dataclass
class Windows:
    """A batch-able stack of token windows and how they were made (recorded in the report)."""

    input_ids: torch.Tensor  # (n, seq_len) int64
    protocol: dict
    score_from: int = 1  # first position whose token is scored (0 would need a BOS before it)

    @property
    def token_hash(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def token_stream(tokenizer, texts: List[str]) -> torch.Tensor:
    """All texts joined by a blank line, tokenized once (no BOS/EOS added)."""
    if not texts:
        raise DataError("the dataset part is empty")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> Windows:
    """`num_samples` distinct windows of `seq_len` tokens, chosen with `seed` among non-overlapping chunks."""
    chunks = stream.numel() // seq_len
    if chunks < num_samples:
        raise DataError(
            f"calibration needs num_samples × seq_len = {num_samples} × {seq_len} = {num_samples * seq_len} tokens, "
            f"but the calibration data has {stream.numel()} tokens; lower calibration.num_samples or "
            f"calibration.seq_len, or use a larger dataset"
        )
    order = torch.randperm(chunks, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    ids = stream[: chunks * seq_len].reshape(chunks, seq_len)[order]
    return Windows(ids, {"num_samples": num_samples, "seq_len": seq_len, "seed": seed, "tokens": int(ids.numel()),
                         "stream_tokens": int(stream.numel())})


def evaluation_windows(stream: torch.Tensor, seq_len: int, max_windows: Optional[int]) -> Windows:
    """Consecutive non-overlapping windows from the start of the evaluation stream (the pinned protocol)."""
    n = stream.numel() // seq_len
    if n < 1:
        raise DataError(
            f"evaluation needs at least seq_len = {seq_len} tokens, but the evaluation data has {stream.numel()}; "
            "lower evaluation.seq_len or use more text"
        )
    if max_windows:
        n = min(n, max_windows)
    ids = stream[: n * seq_len].reshape(n, seq_len)
    protocol = {
        "seq_len": seq_len,
        "stride": seq_len,
        "windows": n,
        "scored_tokens_per_window": seq_len - 1,
        "bos": "none added; the first token of each window is context only",
        "level": "token (natural-log NLL averaged over every scored token; perplexity = exp of it)",
        "stream_tokens": int(stream.numel()),
    }
    return Windows(ids, protocol)
