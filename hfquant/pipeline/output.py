"""The output folder: refuse to clobber, write to a temporary name and rename when complete.

A run's folder "looks complete" only when `model/` and `report.json` are both there; `model/` appears by a
single rename after it is fully written, and `report.json` is written last, atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile

from ..errors import HfquantError

log = logging.getLogger("hfquant")


class OutputExistsError(HfquantError, FileExistsError):
    """The output folder already holds a run and neither overwrite nor resume was asked for."""


class OutputFolderError(HfquantError, OSError):
    """output_dir cannot be used: a file, not writable, or too little space."""


def model_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "model")


RESUME_RECORD = ".hfquant-resume.json"
PARTIAL_PREFIXES = (".model.partial-", ".model.old-", ".tmp-")


def has_finished_model(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir(output_dir), "config.json"))


def check_writable(output_dir: str) -> None:
    """Before any work: output_dir must be (or become) a folder this process can write in."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputFolderError(f"output_dir {output_dir!r} is a file, not a folder; choose another output_dir")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"cannot create output_dir {output_dir!r}: {exc.strerror}; choose a folder you can "
                                "write to") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OutputFolderError(f"output_dir {output_dir!r} is not writable (permission denied); choose a folder you "
                                "can write to, or fix its permissions")


def prepare_output(output_dir: str, overwrite: bool, resume: bool) -> None:
    """Check the folder before any expensive work (call it while holding the folder's lock): refuse to clobber
    a run, remove temporary folders that killed runs left, and with overwrite un-mark the old run as complete."""
    existing = [n for n in ("model", "report.json", "report.md") if os.path.exists(os.path.join(output_dir, n))]
    if existing and not (overwrite or resume):
        raise OutputExistsError(
            f"output_dir {output_dir!r} already holds a run ({', '.join(existing)}); pass overwrite=true to replace "
            "it, resume=true to reuse its quantized model, or choose another output_dir"
        )
    if resume and not resumable(output_dir):
        raise OutputExistsError(f"resume=true, but {output_dir!r} has no finished model/ to resume from (a run that "
                                "failed or was interrupted before its model was saved and checked leaves none); run "
                                "without resume=true")
    os.makedirs(output_dir, exist_ok=True)
    remove_partials(output_dir)
    if overwrite and not resume:
        for name in ("report.json", "report.md", RESUME_RECORD):
            path = os.path.join(output_dir, name)
            if os.path.exists(path):
                os.remove(path)


def remove_partials(output_dir: str) -> list:
    """Temporary folders and files of runs that died before renaming them into place (SIGKILL, power loss).
    Only safe while holding the folder's lock: no live run can be writing them then."""
    removed = []
    for name in os.listdir(output_dir):
        if name.startswith(PARTIAL_PREFIXES):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    if removed:
        log.warning("removed %d temporary item(s) left in %s by an interrupted run: %s", len(removed), output_dir,
                    ", ".join(sorted(removed)))
    return removed


def resumable(output_dir: str) -> bool:
    """A finished `model/` that a run recorded as complete (and checked, when a check ran): `resume` accepts
    nothing less. Folders from hfquant versions without the record count when their report.json says so."""
    if not has_finished_model(output_dir):
        return False
    if read_resume_record(output_dir) is not None:
        return True
    legacy = read_json(os.path.join(output_dir, "report.json"))
    return bool(legacy) and legacy.get("reload_check", {}).get("ok", True) is not False


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_resume_record(output_dir: str):
    return read_json(os.path.join(output_dir, RESUME_RECORD))


def write_resume_record(output_dir: str, request: dict, reference=None) -> None:
    """Written once `model/` is in place (and passed its reload check): what it was made from, for `resume`."""
    write_json(os.path.join(output_dir, RESUME_RECORD), {"request": request, "reload_reference": reference})


def discard_model(output_dir: str) -> None:
    """Remove a `model/` this run published but could not vouch for, with its resume record."""
    shutil.rmtree(model_dir(output_dir), ignore_errors=True)
    path = os.path.join(output_dir, RESUME_RECORD)
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
    """Move a fully written folder into place as `model/`, replacing an old one only after the new one exists.
    Its files get the permissions a normal `open` would give: safetensors' `save_file` makes them private (0600),
    which left `model.safetensors` unreadable to the other users of a shared folder while the rest was not."""
    _normal_file_permissions(partial)
    final = model_dir(output_dir)
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=".model.old-", dir=output_dir)
        os.rename(final, os.path.join(old, "model"))
    os.rename(partial, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _file_mode() -> int:
    """What a plain `open` gives a new file under the process's umask."""
    return 0o666 & ~_umask()


def _normal_file_permissions(folder: str) -> None:
    mode = _file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def write_atomic(path: str, text: str) -> None:
    """`path` holds the whole of `text` or what it held before (a failed write leaves no `.tmp-*` behind)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
