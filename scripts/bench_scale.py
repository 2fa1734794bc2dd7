#!/usr/bin/env python
"""Streaming quantization at scale: synthetic Llama-layout checkpoints of a chosen size, quantized by the real
`hfquant` command, against the physical floor (read the input, write an output of the same size) measured in
the same run, cold page cache for both.

    .venv/bin/python scripts/bench_scale.py --sizes 1 4 16 28 --schemes w8a16 w4a16 [--dir /var/tmp/hfquant-scale]

Each checkpoint is bf16, hidden 4096 / intermediate 11008 / 32 heads (8 KV) / vocab 32000 — a Llama-2-7B
layer — with as many layers as the size needs, written shard by shard (5 GB) so writing it needs no memory
either; no tokenizer (so the run also shows a tokenizer-less folder quantizes). Wall time includes Python
start-up and imports. Results go to
`docs/results/bench_scale.json`; `docs/benchmarks.md` discusses them. Peak RSS is the child's own high-water
mark (VmHWM, as hfquant reports it): `ru_maxrss` from `wait4` also counts this script's memory at fork.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from hfquant.formats.safetensors_stream import StreamingSafetensorsWriter  # noqa: E402

GiB = 2**30
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 4096, 11008, 32, 8, 32000
DTYPE = torch.bfloat16
CHUNK = 64 * 2**20


def layer_shapes(i: int):
    head_dim = HIDDEN // HEADS
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ]


def nbytes(shape) -> int:
    n = 2
    for d in shape:
        n *= d
    return n


def checkpoint_shapes(size_gib: float):
    outer = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    per_layer = sum(nbytes(s) for _, s in layer_shapes(0))
    layers = max(1, round((size_gib * GiB - sum(nbytes(s) for _, s in outer)) / per_layer))
    shapes = [outer[0]] + [t for i in range(layers) for t in layer_shapes(i)] + outer[1:]
    return layers, shapes


def write_checkpoint(folder: str, size_gib: float, shard_bytes: int = 5 * 10**9) -> dict:
    """Random bf16 weights (a few random blocks per shape, scaled per layer so no two tensors are equal),
    written shard by shard with an index, like a Hub checkpoint."""
    from transformers import LlamaConfig

    layers, shapes = checkpoint_shapes(size_gib)
    os.makedirs(folder, exist_ok=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    shards, current, size = [], [], 0
    for name, shape in shapes:
        if current and size + nbytes(shape) > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes(shape)
    shards.append(current)
    gen = torch.Generator().manual_seed(0)
    pool = {}
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingSafetensorsWriter(os.path.join(folder, fname), {n: (DTYPE, s) for n, s in shard}, {"format": "pt"}) as w:
            for i, (name, shape) in enumerate(shard):
                if shape not in pool:
                    pool[shape] = (torch.randn(shape, generator=gen) * 0.02).to(DTYPE) if len(shape) == 2 else torch.ones(shape, dtype=DTYPE)
                w.write(name, pool[shape] * (1.0 + 0.001 * ((k * 997 + i) % 1000)) if len(shape) == 2 else pool[shape])
                weight_map[name] = fname
                total += nbytes(shape)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return {"layers": layers, "bytes": total, "shards": len(shards)}


def drop_cache(paths) -> None:
    """Evict files from the page cache (clean pages; no root needed) so every measurement starts cold."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_in(folder: str):
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))]


def floor_seconds(inputs, out_bytes: int, scratch: str) -> dict:
    """Read every input byte and write `out_bytes` new bytes, in 64 MiB chunks: what no tool can beat."""
    drop_cache(inputs)
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(memoryview(buf)[: min(CHUNK, left)])
    write_s = time.perf_counter() - start
    os.remove(scratch)
    return {"read_s": read_s, "write_s": write_s, "floor_s": read_s + write_s}


def run_hfquant(model_dir, out_dir: str, scheme: str, extra=("calibration=none",)) -> dict:
    """The real command, as a user types it; peak RSS from the kernel's accounting of the child."""
    exe = os.path.join(os.path.dirname(sys.executable), "hfquant")
    model = [f"model.path={model_dir}"] if model_dir else []
    cmd = [exe, *model, f"scheme={scheme}", "evaluation=none", f"output_dir={out_dir}", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}")
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    # Peak RSS: the child's own VmHWM (reported by hfquant); wait4's ru_maxrss would include this script's
    # memory at fork time, inflating it (kept for reference).
    return {"command": " ".join(["hfquant", *cmd[1:]]), "wall_s": wall,
            "peak_rss_bytes": report["peak_memory"]["rss_bytes"], "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "pipeline": report["run"]["pipeline"], "backend": report["run"]["backend"],
            "stages_s": report["timings"], "output_bytes": report["quantized"]["size"]["bytes_on_disk"],
            "streamed": report["quantization"].get("streamed"),
            "weight_sqnr_db": report["quantization"].get("weight_sqnr_db")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[1, 4, 16])
    ap.add_argument("--schemes", nargs="+", default=["w8a16", "w4a16"])
    ap.add_argument("--dir", default="/var/tmp/hfquant-scale")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for the next run")
    ap.add_argument("--sequential", action="store_true",
                    help="also: w8a8-static calibration of the default model, layer by layer vs whole model")
    ap.add_argument("--algorithm", default=None, help="e.g. gptq: a data-hungry algorithm, run layer by layer on "
                    "random calibration token ids (calibration=random), as streaming GPTQ of a large model would")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows of 512 random tokens (--algorithm)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_scale.json"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
               "runs": []}
    for size in args.sizes:
        ckpt = os.path.join(args.dir, f"llama-{size:g}gib")
        if not os.path.isfile(os.path.join(ckpt, "model.safetensors.index.json")):
            shutil.rmtree(ckpt, ignore_errors=True)
            start = time.perf_counter()
            info = write_checkpoint(ckpt, size)
            print(f"wrote {ckpt}: {info['bytes'] / GiB:.2f} GiB, {info['layers']} layers in {time.perf_counter() - start:.0f} s", flush=True)
        inputs = files_in(ckpt)
        in_bytes = sum(os.path.getsize(p) for p in inputs)
        for scheme in args.schemes:
            out = os.path.join(args.dir, f"out-{size:g}-{scheme}")
            shutil.rmtree(out, ignore_errors=True)
            drop_cache(inputs)
            extra = ("calibration=none",) if not args.algorithm else (
                f"algorithm={args.algorithm}", "calibration=random", f"calibration.num_samples={args.samples}",
                "pipeline=streaming")
            run = run_hfquant(ckpt, out, scheme, extra)
            shutil.rmtree(out, ignore_errors=True)  # disk: the floor writes the same number of bytes again
            floor = floor_seconds(inputs, run["output_bytes"], os.path.join(args.dir, "floor.tmp"))
            row = {"size_gib": size, "input_bytes": in_bytes, "scheme": scheme, "algorithm": args.algorithm or "rtn",
                   **run, **floor,
                   "time_vs_floor": run["wall_s"] / floor["floor_s"],
                   "stream_vs_floor": run["stages_s"].get("stream quantize", run["wall_s"]) / floor["floor_s"]}
            results["runs"].append(row)
            print(f"{size:g} GiB {scheme}: {run['wall_s']:.1f} s wall (stream {run['stages_s'].get('stream quantize', 0):.1f} s), "
                  f"peak RSS {run['peak_rss_bytes'] / GiB:.2f} GiB, floor {floor['floor_s']:.1f} s "
                  f"(read {floor['read_s']:.1f} + write {floor['write_s']:.1f}) → {row['time_vs_floor']:.2f}× floor", flush=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    if args.sequential:
        results["sequential_calibration"] = []
        for pipeline in ("in_memory", "streaming"):
            out = os.path.join(args.dir, f"out-default-w8a8-static-{pipeline}")
            shutil.rmtree(out, ignore_errors=True)
            run = run_hfquant(None, out, "w8a8-static", extra=(f"pipeline={pipeline}",))
            results["sequential_calibration"].append(run)
            print(f"default model w8a8-static, pipeline={pipeline}: {run['wall_s']:.1f} s, "
                  f"peak RSS {run['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
