#!/usr/bin/env python
"""Weight quantization speed: hfquant's row-chunked primitives against a whole-tensor reference (the way
hfquant computed them before the scale work: float32 copy, per-group qparams expanded with
`repeat_interleave`, error by a second quantize + dequantize), same weight, same run, same codes.

    .venv/bin/python scripts/bench_quantize.py [--rows 11008] [--cols 4096] [--repeats 5]

The weight is bf16 (a Llama-2-7B MLP projection by default); times are the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hfquant.plugins import registries  # noqa: E402
from hfquant.quant import compute_qparams, quantize, quantize_with_error  # noqa: E402
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


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args_ns = ap.parse_args()
    w = (torch.randn(args_ns.rows, args_ns.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    observer = registries().observers.get("minmax")
    print(f"weight {args_ns.rows}×{args_ns.cols} bf16, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| scheme | step | reference ms | hfquant ms | speed-up |\n|---|---|---|---|---|")
    for scheme in ("w8a16", "w4a16"):
        args = registries().schemes.get(scheme).weights

        def observe():
            obs = observer(args)
            obs.observe(w)
            return obs.qparams()

        scale, zp = observe()
        ref_scale, ref_zp = reference_observe(w, args)
        assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
        assert torch.equal(quantize(w, scale, zp, args), reference_quantize(w, scale, zp, args))
        steps = [
            ("observe (min-max)", lambda: reference_observe(w, args), observe),
            ("quantize", lambda: reference_quantize(w, scale, zp, args), lambda: quantize(w, scale, zp, args)),
            ("quantize + weight error", lambda: reference_quantize_with_error(w, scale, zp, args),
             lambda: quantize_with_error(w, scale, zp, args, checked=True)),
        ]
        for name, ref, ours in steps:
            r, o = median_ms(ref, args_ns.repeats), median_ms(ours, args_ns.repeats)
            print(f"| {scheme} | {name} | {r:.0f} | {o:.0f} | {r / o:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
