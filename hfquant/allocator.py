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
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES", "LD_PRELOAD")

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
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # glibc only (gnu_get_libc_version): musl has mallopt as a stub that ignores these options
        _ = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt():
    libc = _libc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def advise_huge_pages(tensor):
    """Ask for 2 MiB pages behind a large, fresh CPU buffer before it is written (a weight's codes or packed bytes;
    advice on one already written only lets the kernel merge its pages later):
    above `MMAP_THRESHOLD` each comes from its own fresh mmap, and faulting it in 4 KiB at a time costs ~1 ms per
    MB on a 2-vCPU VM — 40–60% of a w8a16 weight's compiled quantizing (`scripts/bench_quantize.py`). With
    transparent huge pages in `madvise` mode (common) a page fault maps 2 MiB at once. Only the buffer's own
    aligned interior is advised; nothing changes where THP is off, on other platforms, or for small buffers. Only
    where `keep_freed_memory()` is in force: then a block this large is its own mmap, never heap memory that other
    allocations reuse (under the user's own malloc settings or another allocator it may be). Returns `tensor`."""
    nbytes = tensor.numel() * tensor.element_size()
    if (_applied is not True or nbytes < MMAP_THRESHOLD or tensor.device.type != "cpu"
            or not sys.platform.startswith("linux")):
        return tensor
    madvise = _madvise()
    if madvise is not None:
        start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (tensor.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return tensor


HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_madvise_fn = None


def _madvise():
    global _madvise_fn
    if _madvise_fn is None:
        libc = _libc()
        fn = getattr(libc, "madvise", None) if libc is not None else None
        if fn is not None:
            fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
        _madvise_fn = fn or False
    return _madvise_fn or None
