"""Checks of what is loaded, before minutes of work depend on it: every weight finite (named when not), the
baseline's own metrics finite. NaN/Inf found late surface as "the saved model does not reproduce" or a NaN
perplexity, which point at the wrong culprit."""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch

from ..errors import HfquantError, first_few


class NonFiniteError(HfquantError, ValueError):
    """A weight, or the unquantized model's output, holds NaN or Inf."""


def is_finite(t: torch.Tensor) -> bool:
    """Max and min propagate NaN and show ±Inf: two reductions decide it without a bool copy of the tensor."""
    if t.numel() == 0 or not t.is_floating_point() or t.device.type == "meta":
        return True
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def count_nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def nonfinite_message(bad: list, where: str) -> str:
    shown = first_few((f"{name} ({n} of {numel} values)" for name, n, numel in bad), 5, ", ")
    return (f"{where} has NaN or Inf in {len(bad)} tensor(s): {shown}. Quantizing cannot fix broken weights: "
            "re-download or re-export the checkpoint (check the run that produced it for overflow, e.g. float16 "
            "training without loss scaling)")


def check_finite_tensors(named: Iterable[Tuple[str, torch.Tensor]], where: str) -> None:
    """Raise `NonFiniteError` naming every tensor with NaN/Inf (shared storage checked once)."""
    bad, seen = [], set()
    for name, t in named:
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        if not is_finite(t):
            bad.append((name, count_nonfinite(t), t.numel()))
    if bad:
        raise NonFiniteError(nonfinite_message(bad, where))


def check_model_finite(model: torch.nn.Module, where: str) -> None:
    """Every parameter and buffer of a loaded model (one pass of two reductions per tensor)."""
    check_finite_tensors(list(model.named_parameters()) + list(model.named_buffers()), where)


def check_baseline_finite(baseline: dict) -> None:
    """The unquantized model's metrics: NaN here means the model itself is broken on this text, and every
    comparison with the quantized model would be meaningless."""
    for evaluator, metrics in baseline.items():
        for key, value in metrics.items():
            if isinstance(value, float) and not key.startswith("_") and not math.isfinite(value):
                raise NonFiniteError(
                    f"the unquantized model's {key} (evaluator {evaluator!r}) is {value} on the evaluation text: its logits hold NaN "
                    "or Inf, so no quantized result could be compared with it. Check the model (e.g. model.dtype="
                    "float32 instead of float16, whose range can overflow) before quantizing it")


class CheckpointError(HfquantError, ValueError):
    """An input checkpoint that cannot be what its folder says: a corrupt or truncated file, or tensor shapes
    that disagree with config.json."""


def check_safetensors_files(folder: str) -> dict:
    """Every `*.safetensors` file's header parses and the file is as long as its header says (a truncated
    download fails here, naming the input file, not later as a raw error). Returns {tensor name: (file, shape)}."""
    import glob
    import os

    from ..formats.safetensors_stream import SafetensorsFormatError, read_header

    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        try:
            tensors, _, data_start = read_header(path)
        except SafetensorsFormatError as exc:
            raise CheckpointError(f"input checkpoint file {path!r} is corrupt ({exc}); re-download it or "
                                  "re-save the model with save_pretrained") from None
        expected = data_start + max((t.end for t in tensors.values()), default=0)
        actual = os.path.getsize(path)
        if actual < expected:
            raise CheckpointError(f"input checkpoint file {path!r} is truncated: {actual} bytes, its header "
                                  f"describes {expected}; re-download it (an interrupted download or a full disk "
                                  "leaves such files)")
        found.update({name: (path, t.shape) for name, t in tensors.items()})
    return found


def check_shapes_against_config(folder: str, tensors: dict, task: str, trust_remote_code: bool) -> None:
    """Build the architecture from config.json on the meta device and compare every tensor it shares with
    the checkpoint: transformers would otherwise fail with a raw size-mismatch error, or re-initialise."""
    import os

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, (path, shape) in tensors.items():
        want = expected.get(name)
        if want is None and prefix:  # checkpoints saved from the base model or the head model
            want = expected.get(name[len(prefix) + 1:]) if name.startswith(prefix + ".") else expected.get(f"{prefix}.{name}")
        if want is not None and tuple(shape) != want:
            raise CheckpointError(
                f"input checkpoint tensor {name!r} in {os.path.basename(path)!r} has shape {list(shape)}, but "
                f"{os.path.join(folder, 'config.json')!r} makes it {list(want)}: the weights and config.json do "
                "not belong together — re-download the model, or fix config.json")


def explain_load_failure(exc: Exception, source: str, revision, task: str, trust_remote_code: bool):
    """transformers' raw error for a corrupt or truncated safetensors file, or a tensor whose shape disagrees
    with config.json, as a `CheckpointError` naming the file and tensor (the headers re-checked in the local
    folder or the Hub cache); None for any other error."""
    from safetensors import SafetensorError

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    mismatch = isinstance(exc, RuntimeError) and ("ignore_mismatched_sizes" in str(exc) or "size mismatch" in str(exc))
    if not (isinstance(exc, SafetensorError) or mismatch):
        return None
    folder = local_snapshot(source, revision)
    if folder:
        try:
            check_checkpoint(folder, task, trust_remote_code)
        except CheckpointError as precise:
            return precise
    what = "a tensor's shape disagrees with config.json" if mismatch else "a safetensors file is corrupt or truncated"
    return CheckpointError(f"model {source!r}: {what} ({text}); re-download the model (for a Hub id: "
                           "huggingface-cli download --force-download <id>) or re-save it with save_pretrained")


def local_snapshot(source: str, revision) -> "str | None":
    """The folder holding `source`'s files: itself, or its Hub cache snapshot (never downloads)."""
    import os

    if os.path.isdir(source):
        return source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, revision=revision, local_files_only=True)
    except Exception:  # not cached: nothing more to say than transformers' error
        return None


def check_checkpoint(folder: str, task: str, trust_remote_code: bool) -> None:
    """Both checks, on a local safetensors folder (headers only: milliseconds, before any weight is read)."""
    tensors = check_safetensors_files(folder)
    if tensors:
        check_shapes_against_config(folder, tensors, task, trust_remote_code)
