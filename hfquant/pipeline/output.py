"""The output folder: refuse to clobber, write to a temporary name and rename when complete.

A run's folder "looks complete" only when `model/` and `report.json` are both there; `model/` appears by a
single rename after it is fully written, and `report.json` is written last, atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from ..errors import HfquantError


class OutputExistsError(HfquantError, FileExistsError):
    """The output folder already holds a run and neither overwrite nor resume was asked for."""


def model_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "model")


def has_finished_model(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir(output_dir), "config.json"))


def prepare_output(output_dir: str, overwrite: bool, resume: bool) -> None:
    """Check the folder before any expensive work; with overwrite, un-mark the old run as complete first."""
    existing = [n for n in ("model", "report.json", "report.md") if os.path.exists(os.path.join(output_dir, n))]
    if existing and not (overwrite or resume):
        raise OutputExistsError(
            f"output_dir {output_dir!r} already holds a run ({', '.join(existing)}); pass overwrite=true to replace "
            "it, resume=true to reuse its quantized model, or choose another output_dir"
        )
    if resume and not has_finished_model(output_dir):
        raise OutputExistsError(f"resume=true, but {output_dir!r} has no finished model/ to resume from; run without resume")
    os.makedirs(output_dir, exist_ok=True)
    if overwrite and not resume:
        for name in ("report.json", "report.md"):
            path = os.path.join(output_dir, name)
            if os.path.exists(path):
                os.remove(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def partial_dir(output_dir: str) -> str:
    """A fresh temporary folder beside the final one (same file system, so the final rename is atomic),
    with the permissions a normal `mkdir` would give (mkdtemp alone makes it private)."""
    path = tempfile.mkdtemp(prefix=".model.partial-", dir=output_dir)
    os.chmod(path, 0o777 & ~_umask())
    return path


def publish(partial: str, output_dir: str) -> str:
    """Move a fully written folder into place as `model/`, replacing an old one only after the new one exists."""
    final = model_dir(output_dir)
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=".model.old-", dir=output_dir)
        os.rename(final, os.path.join(old, "model"))
    os.rename(partial, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_json(path: str, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
