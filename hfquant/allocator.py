"""glibc malloc thresholds that keep freed working memory instead of handing it back to the kernel at once.

hfquant's quantizing loops allocate and free the same few megabytes over and over (a row chunk's float copy,
its x/scale, its rounded codes). glibc adapts its thresholds to that only by chance: with a small trim threshold
the freed top of the heap goes back to the kernel after every chunk and the next chunk faults its pages in
again. On a 2-vCPU VM each 4 KiB fault costs ~2.2 µs, and round-to-nearest (with its error) of one 11008×4096
bf16 weight took 681 ms instead of 205 ms (`scripts/bench_quantize.py --threads 1 [--glibc-malloc]`;
`docs/benchmarks.md`, "Scale: streaming quantization", Machine B pass). Fixed thresholds — blocks up
to `MMAP_THRESHOLD` come from the heap, up to `TRIM_THRESHOLD` of free heap top is kept — are glibc's own
upper limits for its dynamic adjustment, set up front. Elsewhere (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("hfquant")

MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc pairs with it when it adapts on its own
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
# the user's own malloc settings win: any of these in the environment and hfquant leaves malloc alone
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")

_applied = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True when they are in force. Called by the `hfquant` command's runs
    (not on import: a library should not change its host's allocator); callers embedding hfquant may call it."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    user = [name for name in USER_SETTINGS if os.environ.get(name)]
    if user:
        log.debug("malloc left as configured (%s set)", ", ".join(user))
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has mallopt as a stub that ignores these options
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
