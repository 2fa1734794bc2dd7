#!/usr/bin/env python
"""Weight quantization speed: hfquant's compiled loops (`hfquant/quant/native_kernels.c`), its row-chunked eager
primitives (`HFQUANT_NATIVE_KERNELS=0`), and a whole-tensor reference (the way hfquant computed them before the scale
work: float32 copy, per-group qparams expanded with `repeat_interleave`, error by a second quantize + dequantize),
same weight, same run, same codes.

    .venv/bin/python scripts/bench_quantize.py [--rows 11008] [--cols 4096] [--repeats 5] [--threads N] [--glibc-malloc]

The weight is bf16 (a Llama-2-7B MLP projection by default); times are the median of `--repeats`. The last
columns time the compiled loops again without `hfquant.allocator.advise_huge_pages` (fresh code and packed buffers
faulted in 4 KiB at a time, as before it), where transparent huge pages are in `madvise` mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hfquant.allocator  # noqa: E402
from hfquant.allocator import keep_freed_memory  # noqa: E402
from hfquant.plugins import registries  # noqa: E402
from hfquant.quant import compute_qparams, native, pack, quantize, quantize_with_error  # noqa: E402
from hfquant.quant.primitives import code_dtype, expand_qparam  # noqa: E402
from hfquant.quant.qparams import reduce_by_strategy  # noqa: E402


def reference_observe(w, args):
    x = w.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("non-finite")
    lo = reduce_by_strategy(x, args, lambda t: t.amin(dim=-1, keepdim=True))
    hi = reduce_by_strategy(x, args, lambda t: t.amax(dim=-1, keepdim=True))
    return compute_qparams(lo, hi, args)


def reference_quantize(w, scale, zp, args):
    x = w.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("non-finite")
    q = torch.round(x / expand_qparam(scale, x, args).float()) + expand_qparam(zp, x, args).float()
    return q.clamp_(args.qmin, args.qmax).to(code_dtype(args))


def reference_quantize_with_error(w, scale, zp, args):
    codes = reference_quantize(w, scale, zp, args)
    x = w.float()
    x_hat = expand_qparam(scale, x, args).float() * (codes.float() - expand_qparam(zp, x, args).float())
    return codes, float((x_hat - x).pow(2).sum()), float(x.pow(2).sum())


def reference_pack(q, args):
    """Whole-tensor byte-wise packing (how hfquant packed before): code − qmin, then every i-th byte of each group
    of 8 / bits shifted in."""
    u = q.view(torch.uint8) if q.dtype == torch.int8 else q.to(torch.uint8)
    u = u - (args.qmin & 0xFF) if args.qmin else u.clone()
    per_byte = 8 // args.num_bits
    if per_byte == 1:
        return u
    u = torch.nn.functional.pad(u, (0, (-u.shape[-1]) % per_byte)).reshape(*u.shape[:-1], -1, per_byte)
    out = u[..., 0].clone()
    for i in range(1, per_byte):
        out |= u[..., i] << (args.num_bits * i)
    return out


def eager(fn):
    """`fn` with the compiled loops switched off: the row-chunked torch ops."""
    def run():
        os.environ["HFQUANT_NATIVE_KERNELS"] = "0"
        try:
            return fn()
        finally:
            del os.environ["HFQUANT_NATIVE_KERNELS"]
    return run


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@contextmanager
def small_pages():
    """hfquant without its huge-page advice for fresh buffers (every module that imported the function)."""
    from hfquant.quant import packing

    modules, original = (native, packing), hfquant.allocator.advise_huge_pages
    for module in modules:
        module.advise_huge_pages = lambda tensor: tensor
    try:
        yield
    finally:
        for module in modules:
            module.advise_huge_pages = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (a streamed run quantizes on one)")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave glibc's adaptive malloc thresholds alone (the hfquant command fixes them)")
    args_ns = ap.parse_args()
    if args_ns.threads:
        torch.set_num_threads(args_ns.threads)
    malloc = "glibc default" if args_ns.glibc_malloc else f"hfquant's thresholds: {keep_freed_memory()}"
    w = (torch.randn(args_ns.rows, args_ns.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    observer = registries().observers.get("minmax")
    os.environ.pop("HFQUANT_NATIVE_KERNELS", None)
    compiled = "compiled loops" if native.library() is not None else "compiled loops UNAVAILABLE (eager twice)"
    print(f"weight {args_ns.rows}×{args_ns.cols} bf16, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"malloc {malloc}, {compiled}")
    print("| scheme | step | reference ms | hfquant eager ms | hfquant compiled ms | compiled vs eager "
          "| compiled, 4 KiB pages ms | huge pages vs 4 KiB |\n|---|---|---|---|---|---|---|---|")
    for scheme in ("w8a16", "w4a16"):
        args = registries().schemes.get(scheme).weights

        def observe():
            obs = observer(args)
            obs.observe(w)
            return obs.qparams()

        scale, zp = observe()
        ref_scale, ref_zp = reference_observe(w, args)
        assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
        codes = quantize(w, scale, zp, args)
        assert torch.equal(codes, reference_quantize(w, scale, zp, args))
        assert torch.equal(codes, eager(lambda: quantize(w, scale, zp, args))())
        eager_scale, eager_zp = eager(observe)()
        assert torch.equal(eager_scale, scale) and torch.equal(eager_zp, zp)
        assert torch.equal(pack(codes, args), reference_pack(codes, args))
        steps = [
            ("observe (min-max)", lambda: reference_observe(w, args), observe),
            ("quantize", lambda: reference_quantize(w, scale, zp, args), lambda: quantize(w, scale, zp, args)),
            ("quantize + weight error", lambda: reference_quantize_with_error(w, scale, zp, args),
             lambda: quantize_with_error(w, scale, zp, args, checked=True)),
            ("pack codes", lambda: reference_pack(codes, args), lambda: pack(codes, args)),
        ]
        for name, ref, ours in steps:
            r, e, o = (median_ms(f, args_ns.repeats) for f in (ref, eager(ours), ours))
            with small_pages():
                plain = median_ms(ours, args_ns.repeats)
            print(f"| {scheme} | {name} | {r:.0f} | {e:.0f} | {o:.0f} | {e / o:.2f}× | {plain:.0f} | {plain / o:.2f}× |",
                  flush=True)


if __name__ == "__main__":
    main()
