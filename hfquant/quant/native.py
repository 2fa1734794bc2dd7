"""hfquant's fused CPU loops for the passes every weight goes through — its min / max per group, its codes with their
squared error, and their 2- / 4-bit packing — one trip through memory each instead of a chain of eager ops per row
chunk (docs/benchmarks.md, "Weight quantization primitives"); and, at run time, the `cpu` backend's int4 weights
dequantized for prefill in one pass (`dequant_int4`; the first such prefill on a machine may wait for the build).
Same numbers as the eager path: the same IEEE float32 division and half-to-even rounding, so the codes are
bit-identical (tests/test_native_kernels.py); the error sums are float32 per group, as the eager path's, and float64
across groups.

The C source (`native_kernels.c`) is compiled on first use with the system's C compiler (`$CC`, else `cc`) into
`$HFQUANT_CACHE/native/`, keyed by the source, the compiler and the instruction sets it resolves for this CPU; a cache
folder or file that another user could have written is not loaded (the library is then built privately per process). Without a
compiler, or when the build fails, or with `HFQUANT_NATIVE_KERNELS=0`, everything runs the eager path — slower, same
codes. Only contiguous 2-D CPU weights in bfloat16, float16 or float32 with per-group or per-channel qparams take
this path; everything else (float64 reference math, per-tensor scales, activations) stays eager.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from typing import Optional, Tuple

import torch

from ..allocator import advise_huge_pages
from ..cache import cache_root
from .args import QuantArgs

log = logging.getLogger("hfquant")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_kernels.c")
DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
THREADS_FROM = 1 << 21  # dequant_int4 splits a weight across torch's threads from this many elements on
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-pthread"]

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False


def enabled() -> bool:
    return os.environ.get("HFQUANT_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built once per machine; None where they cannot be had (the eager path runs)."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:  # the hot path: every weight asks
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _cached_or_private()
            except Exception as exc:  # whatever a compiler or loader does, quantizing goes on without them
                log.info("hfquant's native kernels are unavailable (%s); torch ops run instead (same codes and "
                         "weights, slower quantization and int4 prefill)",
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                _library = None
            _tried = True  # after `_library` is set: the unlocked check above must not see a half-done build
        return _library


def _cached_or_private() -> ctypes.CDLL:
    """The library from the cache when the cache is this user's own (nobody else could have put a library there);
    else — a shared or read-only cache, or a cached file that does not load — one built in a private folder for this
    process."""
    _compiler()  # none: say so before touching the cache
    folder = os.path.join(cache_root(), "native")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if _private(folder):
            path = _build(folder=folder)
            if _private(path):
                try:
                    return _load(path)
                except OSError:
                    os.unlink(path)  # damaged or unloadable: built again below, privately
    except OSError:
        pass
    private = tempfile.mkdtemp(prefix="hfquant-native-")
    try:
        return _load(_build(folder=private))  # loaded libraries stay mapped after their file is gone
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _private(path: str) -> bool:
    """Owned by this user and writable by nobody else."""
    info = os.stat(path)
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _compiler() -> list:
    command = shlex.split(os.environ.get("CC") or "cc")  # e.g. CC="ccache gcc"
    if not command or shutil.which(command[0]) is None:
        raise RuntimeError(f"no C compiler ({' '.join(command) or 'CC'!r} not found)")
    return command


def _run(command: list, timeout: float, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, errors="replace", timeout=timeout)


def _build(flags=FLAGS, folder: Optional[str] = None) -> str:
    """The path of the compiled library for this source, compiler and flags (compiled now if absent). The key holds
    the macros the compiler defines for these flags — for -march=native, the instruction sets it resolved on this
    CPU — so a cache shared with a machine that lacks them never hands it a library it cannot run."""
    compiler = _compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = _run([*compiler, "--version"], 60).stdout
    macros = _run([*compiler, *[f for f in flags if f.startswith(("-m", "-D"))], "-dM", "-E", "-x", "c", "-"], 60,
                  stdin="").stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), macros.encode(),
                                     platform.machine().encode()])).hexdigest()[:24]
    folder = folder or os.path.join(cache_root(), "native")
    target = os.path.join(folder, f"quant-{key}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".quant-", suffix=".so")
    os.close(fd)
    try:
        done = _run([*compiler, *flags, "-o", tmp, SOURCE, "-lm"], 120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {(done.stderr or done.stdout).strip()}")
        os.replace(tmp, target)  # atomic: a concurrent run sees the old state or a whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("compiled hfquant's native quantization kernels into %s", target)
    return target


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hfq_min_max.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, ctypes.c_int]
    lib.hfq_min_max.restype = ctypes.c_int
    lib.hfq_codes.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_float,
                              ctypes.c_float, ptr, ptr, ctypes.c_int]
    lib.hfq_codes.restype = ctypes.c_int
    lib.hfq_pack.argtypes = [ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr, ctypes.c_int]
    lib.hfq_pack.restype = ctypes.c_int
    lib.hfq_dequant_int4.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.hfq_dequant_int4.restype = ctypes.c_int
    return lib


def _usable_scales(scale: torch.Tensor) -> bool:
    """Finite and non-zero, as `compute_qparams` makes them (anything else: the eager path's own behaviour)."""
    return bool(torch.isfinite(scale).all()) and bool((scale != 0).all())


def _group(x: torch.Tensor, args: QuantArgs) -> Optional[int]:
    """Columns per scale for a weight this path takes, else None."""
    if (x.dim() != 2 or x.device.type != "cpu" or x.dtype not in DTYPES or not x.is_contiguous() or x.numel() == 0
            or x.requires_grad and torch.is_grad_enabled()):
        return None
    if args.strategy == "group":
        return args.group_size
    return x.shape[1] if args.strategy == "channel" else None


def min_max(x: torch.Tensor, args: QuantArgs, lib: Optional[ctypes.CDLL] = None
            ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) per group (rows, groups) or per row (rows, 1), float32 — what `reduce_by_strategy` gives; None
    when this path does not apply or the weight is not finite (the caller's eager path then runs and explains).
    `lib`: another build of the kernels (tests compare the portable build with this CPU's)."""
    group = _group(x, args)
    lib = (lib or library()) if group else None
    if lib is None:
        return None
    rows, cols = x.shape
    groups = -(-cols // group)
    lo = torch.empty(rows, groups, dtype=torch.float32)
    hi = torch.empty(rows, groups, dtype=torch.float32)
    status = lib.hfq_min_max(x.data_ptr(), DTYPES[x.dtype], rows, cols, group, lo.data_ptr(), hi.data_ptr(),
                             torch.get_num_threads())
    return (lo, hi) if status == 0 else None


def codes_with_error(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], args: QuantArgs,
                     out_dtype: torch.dtype, lib: Optional[ctypes.CDLL] = None
                     ) -> Optional[Tuple[torch.Tensor, float, float]]:
    """(codes, Σ(x̂ − x)², Σx²) as `primitives.quantize_with_error` computes them, or None when this path does not
    apply (shapes, dtypes, float64 qparams) or the weight is not finite."""
    group = _group(x, args)
    if not group:
        return None
    rows, cols = x.shape
    groups = -(-cols // group)
    if (scale.dtype != torch.float32 or tuple(scale.shape) != (rows, groups) or scale.device.type != "cpu"
            or out_dtype not in (torch.int8, torch.uint8) or not _usable_scales(scale)):
        return None
    zero = None
    if zero_point is not None and bool(zero_point.any()):
        if (tuple(zero_point.shape) != (rows, groups) or zero_point.device.type != "cpu"
                or zero_point.dtype.is_floating_point != args.float_zero_point or zero_point.dtype == torch.float64):
            return None  # e.g. a fractional zero point where codes add an integer one: the eager path's rules
        zero = zero_point.to(torch.float32).contiguous()
    lib = lib or library()
    if lib is None:
        return None
    scale = scale.contiguous()
    codes = advise_huge_pages(torch.empty(rows, cols, dtype=out_dtype))  # written once, whole: 2 MiB page faults
    sums = (ctypes.c_double * 2)()
    status = lib.hfq_codes(x.data_ptr(), DTYPES[x.dtype], rows, cols, group, scale.data_ptr(),
                           zero.data_ptr() if zero is not None else None, int(args.float_zero_point),
                           float(args.qmin), float(args.qmax), codes.data_ptr(), sums, torch.get_num_threads())
    return (codes, sums[0], sums[1]) if status == 0 else None


def pack(q: torch.Tensor, args: QuantArgs, bits: int, out: torch.Tensor, lib: Optional[ctypes.CDLL] = None) -> bool:
    """2-, 4- or 8-bit codes of a contiguous 2-D CPU tensor packed into `out` (uint8, contiguous, the packed shape) in
    one pass, `packing.pack`'s layout; False when this path does not apply (the caller packs with torch ops)."""
    if (bits not in (2, 4, 8) or q.dim() != 2 or q.device.type != "cpu" or q.dtype not in (torch.int8, torch.uint8)
            or not q.is_contiguous() or q.numel() == 0 or out.device.type != "cpu" or not out.is_contiguous()
            or out.dtype != torch.uint8 or tuple(out.shape) != (q.shape[0], -(-q.shape[1] * bits // 8))):
        return False
    lib = lib or library()
    if lib is None:
        return False
    return lib.hfq_pack(q.data_ptr(), q.shape[0], q.shape[1], bits, args.qmin, out.data_ptr(),
                        torch.get_num_threads()) == 0


def dequant_int4(packed: torch.Tensor, in_features: int, group: int, scales_zeros: torch.Tensor, row0: int,
                 out_dtype: torch.dtype, lib: Optional[ctypes.CDLL] = None) -> Optional[torch.Tensor]:
    """Rows of packed int4 codes (uint8, low nibble first, stored value q in 0..15) as (q − 8)·scale + zero in
    `out_dtype` (float32 or bfloat16), one pass: the dense (prefill) path of `formats.kernels.Int4WeightLinear`, whose
    eager version is seven torch ops over the weight. `scales_zeros`: the int4 kernel's (groups, out, 2) bfloat16
    pairs; `packed`'s first row is row `row0` there. The values are bit-identical to the torch ops' for finite
    results. None when this path does not apply (the caller's torch ops run)."""
    if (group < 2 or (group % 2 and group < in_features)  # the C loop's rule: each group starts on a whole byte
            or packed.dim() != 2 or packed.dtype != torch.uint8 or not packed.is_contiguous()
            or packed.device.type != "cpu"
            or packed.shape[1] != -(-in_features // 2) or out_dtype not in (torch.float32, torch.bfloat16)
            or scales_zeros.dtype != torch.bfloat16 or not scales_zeros.is_contiguous() or scales_zeros.dim() != 3
            or scales_zeros.device.type != "cpu" or scales_zeros.shape[0] != -(-in_features // group)
            or scales_zeros.shape[2] != 2
            or not 0 <= row0 <= scales_zeros.shape[1] - packed.shape[0] or packed.numel() == 0):
        return None
    lib = lib or library()
    if lib is None:
        return None
    out = torch.empty(packed.shape[0], in_features, dtype=out_dtype, device="cpu")
    # one thread below THREADS_FROM elements: starting a second costs more than it saves (~70 µs vs 0.1 ms for a
    # 1536 × 576 weight on one core; docs/benchmarks.md)
    threads = torch.get_num_threads() if out.numel() >= THREADS_FROM else 1
    status = lib.hfq_dequant_int4(packed.data_ptr(), packed.shape[0], in_features, group, scales_zeros.data_ptr(),
                                  scales_zeros.shape[1], row0, int(out_dtype == torch.bfloat16), out.data_ptr(),
                                  threads)
    return out if status == 0 else None
