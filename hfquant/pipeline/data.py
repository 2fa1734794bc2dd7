"""Token windows for calibration (random, seeded) and evaluation (consecutive, pinned protocol).

Each part's texts are joined with a blank line and tokenized once, without special tokens, into one stream;
windows are cut from that stream. Calibration and evaluation come from disjoint parts of the dataset.
Datasets are built (and local files checked) by `check_sources` before the model loads, so a bad file fails
in milliseconds; a part too short for one window is named with its token count once it is tokenized.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional

import torch
from ..errors import HfquantError

PARTS = ("calibration", "evaluation")


class DataError(HfquantError, ValueError):
    """Unreadable or too little data; says which file or part, how many tokens there are, and the way out.
    `option` names the dataset option at fault (`files`): the run prefixes it with `calibration.`/`evaluation.`."""

    def __init__(self, message: str, option: Optional[str] = None) -> None:
        super().__init__(message)
        self.option = option


class MissingDataError(DataError, FileNotFoundError):
    """A data file named in the config does not exist."""


class DataUnavailableError(DataError, RuntimeError):
    """A dataset could not be fetched (offline without a cache, unknown repository or split)."""


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
    """All texts joined by a blank line, tokenized once (no BOS/EOS added); no texts → no tokens."""
    if not texts:
        return torch.zeros(0, dtype=torch.long)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                        where: str = "the calibration data") -> Windows:
    """`num_samples` distinct windows of `seq_len` tokens, chosen with `seed` among non-overlapping chunks."""
    chunks = stream.numel() // seq_len
    if chunks < num_samples:
        raise DataError(
            f"calibration needs num_samples × seq_len = {num_samples} × {seq_len} = {num_samples * seq_len} tokens, "
            f"but {where} has {stream.numel()} tokens ({chunks} window(s) of {seq_len} fit); lower "
            "calibration.num_samples or calibration.seq_len, or add text (a larger dataset)"
        )
    order = torch.randperm(chunks, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    ids = stream[: chunks * seq_len].reshape(chunks, seq_len)[order]
    return Windows(ids, {"num_samples": num_samples, "seq_len": seq_len, "seed": seed, "tokens": int(ids.numel()),
                         "stream_tokens": int(stream.numel())})


def evaluation_windows(stream: torch.Tensor, seq_len: int, max_windows: Optional[int],
                       where: str = "the evaluation data") -> Windows:
    """Consecutive non-overlapping windows from the start of the evaluation stream (the pinned protocol)."""
    n = stream.numel() // seq_len
    if n < 1:
        lower = f"lower evaluation.seq_len (to {stream.numel()} or less)" if stream.numel() > 1 else "lower evaluation.seq_len"
        raise DataError(
            f"evaluation needs at least seq_len = {seq_len} tokens, but {where} has {stream.numel()} tokens, "
            f"less than one window; {lower} or add text"
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


def _spec(spec, part: str):
    return spec.calibration if part == "calibration" else spec.evaluation


def build_dataset(spec, part: str):
    """The dataset plugin for `part`, its errors prefixed with the config key (`evaluation.files: ...`)."""
    from ..plugins import registries

    dspec = _spec(spec, part)
    try:
        return registries().datasets.get(dspec.name)(**dspec.options)
    except DataError as exc:
        message = f"{part}.{exc}" if exc.option else f"{part}: {exc}"
        raise type(exc)(message, exc.option) from None


def parts_used(spec) -> List[str]:
    """The parts this run tokenizes (as the pipelines decide: calibration only for static activations or an
    algorithm that learns from layer inputs)."""
    parts = ["evaluation"] if spec.evaluation else []
    if spec.calibration and (spec.scheme.needs_calibration_data or spec.algorithms_need_data) and not spec.resume:
        parts.append("calibration")
    return parts


def check_sources(spec) -> None:
    """Build every dataset the run will read (local files are checked: present, a file, not empty, UTF-8
    text) and run its optional `check(part)`: called before the model loads, so bad data fails in milliseconds."""
    for part in parts_used(spec):
        dataset = build_dataset(spec, part)
        check = getattr(dataset, "check", None)
        if check is not None:
            check(part)


def where(dataset, name: str, part: str) -> str:
    """How an error names a part's data: the dataset's own `where(part)` (which files, which rows), or its name."""
    describe = getattr(dataset, "where", None)
    return describe(part) if describe is not None else f"the {part} part of dataset {name!r}"


def windows(tokenizer, spec, part: str, vocab_size: Optional[int] = None) -> Windows:
    """`part`'s windows, with the dataset's description and the token hash in the protocol. A dataset with
    `token_windows` (e.g. `random`) gives token ids itself: no tokenizer needed, `vocab_size` bounds them."""
    dspec = _spec(spec, part)
    dataset = build_dataset(spec, part)
    if hasattr(dataset, "token_windows") and part == "calibration":
        if vocab_size is None:
            vocab_size = len(tokenizer)
        ids = dataset.token_windows(part, dspec.num_samples, dspec.seq_len, dspec.seed, vocab_size)
        w = Windows(ids, {"num_samples": dspec.num_samples, "seq_len": dspec.seq_len, "seed": dspec.seed,
                          "tokens": int(ids.numel()), "vocab_size": vocab_size})
        w.protocol = dict(w.protocol, dataset=dataset.describe(), token_sha256=w.token_hash)
        return w
    try:
        texts = dataset.texts(part)
    except DataError as exc:
        raise type(exc)(f"{part}.{exc}" if exc.option else f"{part}: {exc}", exc.option) from None
    stream = token_stream(tokenizer, texts)
    place = where(dataset, dspec.name, part)
    if part == "calibration":
        w = calibration_windows(stream, dspec.num_samples, dspec.seq_len, dspec.seed, place)
    else:
        w = evaluation_windows(stream, dspec.seq_len, dspec.max_windows, place)
    describe = getattr(dataset, "describe", lambda: {"name": dspec.name})()
    w.protocol = dict(w.protocol, dataset=describe, token_sha256=w.token_hash)
    return w
