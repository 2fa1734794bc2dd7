"""Ask the kernel to read a local checkpoint's weight files while Python is still starting up.

A run spends its first seconds on one core importing transformers and building the model's skeleton, with the
disk idle; a streamed 4 GiB checkpoint then takes as long again to read. Read-ahead hints (`posix_fadvise
WILLNEED`, no copy into this process) issued from a daemon thread overlap the two. The hints stop at a budget
(a quarter of the memory available, at most half of the free memory: they never evict) and as soon as the pipeline starts
reading tensors itself: the streaming reader drops each tensor's pages once read, and a hint that fell behind it
would read them again. `HFQUANT_PREFETCH=0` turns it off (benchmarks compare both).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, List, Optional

log = logging.getLogger("hfquant")

# The kernel reads at most about one read-ahead window per hint (`read_ahead_kb`, commonly 128 KiB–8 MiB), so
# larger hints are cut short; hints of this size keep the disk busy at ~1 s of system time per 4 GiB.
HINT_BYTES = 8 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_active: Optional["Prefetch"] = None
_lock = threading.Lock()


def weight_files(folder: str) -> List[str]:
    """The folder's weight files in shard order, which is the order the model's tensors are written to them and
    so, roughly, the order a loader reads them; safetensors when there are any (a loader prefers them)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    safetensors = [f for f in files if f.endswith(".safetensors")]
    return safetensors or [f for f in files if f.endswith(WEIGHT_SUFFIXES)]


def hint_budget(meminfo: str = "/proc/meminfo") -> int:
    """Bytes to hint: a quarter of the memory available, and no more than half of what is free — pages read for a
    hint must not evict other pages (a 28 GiB run's start-up was 3–7 s slower when hints of 5.5 GB pushed out an
    earlier run's page cache). 0 where /proc/meminfo says nothing: no hints."""
    found = {}
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "MemFree"):
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    if len(found) < 2:
        return 0
    return min(found["MemAvailable"] // 4, found["MemFree"] // 2)


class Prefetch:
    """One daemon thread hinting `files` in order until `budget` bytes, the end, or `stop()`."""

    def __init__(self, folder: str, files: Iterable[str], budget: int) -> None:
        self.folder, self.files, self.budget = folder, list(files), budget
        self.hinted = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hfquant-prefetch", daemon=True)

    def start(self) -> "Prefetch":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        log.debug("prefetch of %s: %.2f GB hinted", self.folder, self.hinted / 1e9)

    def _run(self) -> None:
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                for offset in range(0, size, HINT_BYTES):
                    if self._stop.is_set() or self.hinted >= self.budget:
                        return
                    length = min(HINT_BYTES, size - offset)
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)  # releases the GIL
                    self.hinted += length
            except OSError as exc:  # a hint is only a hint: the real read reports real errors
                log.debug("prefetch of %s stopped: %s", path, exc)
                return
            finally:
                os.close(fd)


def start_prefetch(folder: str) -> Optional[Prefetch]:
    """Start hinting `folder`'s weight files (stopping a prefetch of another folder; one of this folder goes on);
    None where there is nothing to do."""
    global _active
    folder = os.path.realpath(folder)
    with _lock:
        if _active is not None and _active.folder == folder:
            return _active
    stop_prefetch()
    if os.environ.get("HFQUANT_PREFETCH", "1") == "0" or not hasattr(os, "posix_fadvise"):
        return None
    files = weight_files(folder)
    budget = hint_budget()
    if not files or budget <= 0:
        return None
    with _lock:
        _active = Prefetch(folder, files, budget).start()
        return _active


def prefetch_model(model_cfg) -> None:
    """Start on the composed config's `model` node, before the pipeline is even imported: a local folder
    (`pkg://` resolved) only; anything the pipeline will refuse (a missing folder, a GGUF file) is left to it."""
    from ..errors import HfquantError
    from .load import resolve_path

    if model_cfg is None or not model_cfg.get("path") or model_cfg.get("gguf_file"):
        return
    try:
        folder = resolve_path(str(model_cfg.get("path")))
    except HfquantError:
        return
    if os.path.isdir(folder):
        start_prefetch(folder)


def stop_prefetch() -> None:
    """The pipeline reads tensors itself from here on (or the run ended): no more hints."""
    global _active
    with _lock:
        if _active is not None:
            _active.stop()
            _active = None
