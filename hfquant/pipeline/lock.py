"""One run per output folder: an exclusive lock on `<output_dir>/.hfquant.lock` held for the whole run.

The kernel holds the lock (`flock`), so a run killed with SIGKILL releases it when its process dies: no stale
lock to clean up by hand. The file also records who holds it (pid, host, start time) for the refusal message, and
where the file system has no locks (some network mounts) the pid/host record is the fallback: a lock of a dead
process on this host is taken over; one from another host is refused with the way out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from ..errors import HfquantError

LOCK_NAME = ".hfquant.lock"


class OutputLockedError(HfquantError, RuntimeError):
    """Another hfquant run is writing the same output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another hfquant run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"another hfquant run (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


class OutputLock:
    """`with OutputLock(output_dir):` — refuses (`OutputLockedError`) while another run holds the folder."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                raise OutputLockedError(
                    f"output_dir {self.output_dir!r} is in use by {_describe(_holder(self.path))}; wait for it to "
                    "finish or choose another output_dir (the lock is released automatically when that run ends, "
                    "even if it is killed)")
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # not a file that the previous holder unlinked after we opened it
                break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self.fd = fd

    def _flock(self, fd: int) -> bool:
        """True when this process now holds the lock; False when a live run does."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        # No locking on this file system: trust the record of a live process on this host only.
        holder = _holder(self.path)
        if not holder or holder.get("pid") == os.getpid():
            return True
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", 0)))
        return False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter that opened this file sees it was replaced
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
