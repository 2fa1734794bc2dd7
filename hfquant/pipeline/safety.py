"""What a run promises about its output folder, checked before any expensive work: the folder is writable and
this run's alone (a lock), an existing run is never clobbered, `resume` only continues the same request, there
is room for the result; and what an interrupted or out-of-space run tells its user."""

from __future__ import annotations

import errno
import json
import glob
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from typing import Optional

from ..errors import first_few
from ..formats.safetensors_stream import SafetensorsFormatError, read_header
from .lock import OutputLock
from .output import (OutputExistsError, OutputFolderError, check_writable, prepare_output, read_json,
                     read_resume_record)

log = logging.getLogger("hfquant")


def claim_output(spec, backend: str) -> OutputLock:
    """A writable folder, this run's lock on it, no run to clobber, resume only of the same request, and (when
    the checkpoint's size is known) enough free space. The lock is held until the caller releases it."""
    check_writable(spec.output_dir)
    lock = OutputLock(spec.output_dir)
    try:
        lock.acquire()
    except PermissionError as exc:
        raise OutputFolderError(f"cannot write in output_dir {spec.output_dir!r} ({exc.strerror}); choose a folder "
                                "you can write to") from None
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        raise OutputFolderError(f"output_dir {spec.output_dir!r} is on a read-only file system; choose another "
                                "output_dir") from None
    try:
        prepare_output(spec.output_dir, spec.overwrite, spec.resume)
        if spec.resume:
            check_resume_matches(spec.output_dir, resume_request(spec, backend))
        else:
            check_free_space(spec)
    except BaseException:
        lock.release()
        raise
    return lock


def resume_request(spec, backend: str) -> dict:
    """Everything that decides which integer codes land in `model/`: `resume` must ask for the same."""
    m = spec.model
    path = str(m.get("path"))
    if os.path.isdir(os.path.expanduser(path)):
        path = os.path.abspath(os.path.expanduser(path))
    calibration = None
    if spec.scheme.needs_calibration_data and spec.calibration is not None:
        c = spec.calibration
        calibration = {"name": c.name, "options": c.options, "seq_len": c.seq_len, "num_samples": c.num_samples,
                       "seed": c.seed}
    return {
        "model": {"path": path, "gguf_file": m.get("gguf_file"), "revision": m.get("revision"),
                  "dtype": m.get("dtype", "float32"), "task": m.get("task", "causal-lm")},
        "scheme": spec.scheme.to_dict(),
        "observer": spec.observer,
        "observer_options": dict(spec.observer_options or {}),
        "backend": backend,
        "calibration": calibration,
        "codes_from": _codes_from(spec),
    }


def _codes_from(spec) -> dict:
    """The algorithms (auto, or each one with the options it changed), what they learned from and how layer inputs
    were propagated: a resume with other settings would report codes these did not choose."""
    from .layerwise import changed_options

    changed = changed_options(spec.algorithms)
    algorithms = "auto" if spec.algorithm_auto else [[n, changed.get(n, {})] for n in spec.algorithms]
    out = {"algorithms": algorithms, "propagate": spec.propagate}
    if spec.algorithms_need_data and spec.calibration is not None:
        c = spec.calibration
        out["calibration"] = {"name": c.name, "options": c.options, "seq_len": c.seq_len, "num_samples": c.num_samples,
                              "seed": c.seed, "generated": c.generated}
    return out


def _differences(held, wanted, prefix: str = "") -> list:
    if isinstance(held, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(held) | set(wanted), key=str):
            out += _differences(held.get(key), wanted.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if held == wanted else [f"{prefix}: {held!r} in the folder, {wanted!r} now"]


def _legacy_request(output_dir: str, wanted: dict) -> Optional[dict]:
    """What a folder written before resume records existed says about itself (its report.json's run header)."""
    report = read_json(os.path.join(output_dir, "report.json")) or {}
    run = report.get("run")
    if not run:
        return None
    return {"scheme": {**wanted["scheme"], "name": run.get("scheme")}, "observer": run.get("observer"),
            "observer_options": run.get("observer_options", wanted["observer_options"]),
            "backend": run.get("backend", wanted["backend"]), "model": wanted["model"],
            "calibration": wanted["calibration"]}


def check_resume_matches(output_dir: str, wanted: dict) -> None:
    """Refuse to resume from a model made by a different request: the report would describe a model it did
    not make."""
    record = read_resume_record(output_dir)
    if not _holds_hfquant_format(output_dir):
        raise OutputExistsError(f"resume=true, but {output_dir!r} holds a folder exported to another format "
                                "(compressed-tensors, gguf); resume reuses hfquant-format folders — run without "
                                "resume=true (overwrite=true to replace it)")
    held = record.get("request") if record else _legacy_request(output_dir, wanted)
    if held is None:
        raise OutputExistsError(f"resume=true, but {output_dir!r} does not record what its model/ was made from; "
                                "run without resume=true (overwrite=true to replace it)")
    if "codes_from" not in held:  # recorded before algorithms were: compare what it recorded
        wanted = {k: v for k, v in wanted.items() if k != "codes_from"}
    diffs = _differences(held, wanted)
    # a scheme's description (paragraphs of prose) follows from its name: listed only if nothing else differs
    diffs = [d for d in diffs if not d.startswith("scheme.description:")] or diffs
    if diffs:
        shown = first_few(diffs, 6)
        raise OutputExistsError(
            f"resume=true, but the model in {output_dir!r} was made by a different request — {shown}. Use the "
            "settings it was made with, or run without resume=true (overwrite=true to replace it, or another "
            "output_dir)")


def _holds_hfquant_format(output_dir: str) -> bool:
    """Whether `model/` is a transformers folder hfquant can reload (not an exported GGUF / compressed-tensors one)."""
    config = os.path.join(output_dir, "model", "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            q = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") != "compressed-tensors"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def needed_bytes(spec) -> Optional[int]:
    """A lower bound of what the run writes: every checkpoint parameter at the scheme's weight bits. Known only
    for a local safetensors checkpoint (headers are read, not data)."""
    path = os.path.expanduser(str(spec.model.get("path", "")))
    if spec.model.get("gguf_file") or not os.path.isdir(path):
        return None
    files = glob.glob(os.path.join(path, "*.safetensors"))
    if not files:
        return None
    bits = spec.scheme.weights.num_bits if spec.scheme.weights is not None else 16
    try:
        params = sum(info.numel for f in files for info in read_header(f)[0].values())
    except (OSError, SafetensorsFormatError):
        return None  # the loader names a broken file more precisely
    from ..config import written_from

    copies = 2 if written_from(getattr(spec, "format", "auto")) != getattr(spec, "format", "auto") else 1
    return copies * params * bits // 8  # an export format briefly holds its folder next to hfquant's


def check_free_space(spec) -> None:
    need = needed_bytes(spec)
    if need is None:
        return
    free = shutil.disk_usage(spec.output_dir).free
    if free < need:
        raise OutputFolderError(
            f"output_dir {spec.output_dir!r} has {_gib(free)} free, and this run writes at least {_gib(need)} "
            f"(every parameter at {spec.scheme.weights.num_bits if spec.scheme.weights else 16} bits); free some "
            "space or choose another output_dir")


def no_space_message(spec, stage: str) -> str:
    free = shutil.disk_usage(spec.output_dir).free if os.path.isdir(spec.output_dir) else 0
    need = needed_bytes(spec)
    return (f"no space left on the device of output_dir {spec.output_dir!r} during {stage} ({_gib(free)} free now"
            + (f"; this run writes at least {_gib(need)}" if need else "")
            + "); its temporary files were removed — free some space or choose another output_dir")


def interruption_message(stage: str, kept: Optional[str]) -> str:
    return f"interrupted during {stage}; " + (kept or "nothing was written to output_dir")



@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's or `kill`'s polite stop) ends a run like Ctrl-C: cleaned up, one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
