#!/usr/bin/env python
"""hfquant on CUDA, measured: the device machine some sessions are lent (see docs/benchmarks.md "On CUDA").

    python scripts/bench_gpu.py --tokenizer DIR [--shapes smollm2-360m,smollm2-1.7b] [--out bench_gpu.json]

Random-initialised Llama models of SmolLM2's shapes in bfloat16 — the embedded checkpoint (94 MB) cannot travel to
that machine — so the numbers are speed and memory only; quality is measured on CPU with the real model. Three parts:
1. bfloat16 against hfquant's bitsandbytes backend (nf4, fp4, llm-int8): decode (batch 1, 32-token prompt,
   64 greedy tokens) and prefill (512 tokens) tokens/s (median of 5 after a whole warm-up decode), resident bytes, time to quantize. bf16 is timed first and
   last; ratios use the mean.
2. Evaluation windows per forward: `evaluation.batch_size=1` against auto, same windows, same numbers.
3. The default recipe (AWQ then GPTQ, mixed calibration) and round-to-nearest as a user runs them, `hfquant ...
   device=cuda` on a saved checkpoint of the larger shape: each stage's seconds from the run's report.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_backends import hfquant_variant, resident_bytes, speed  # noqa: E402
from hfquant.pipeline.data import evaluation_windows  # noqa: E402
from hfquant.plugins import registries  # noqa: E402

SHAPES = {  # SmolLM2's published configurations (random weights); "tiny" is for a dry run with --device cpu
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
}
BNB_SCHEMES = ("nf4", "fp4", "llm-int8")


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def random_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                         rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def speed_rows(shape: str, stream: torch.Tensor, new_tokens: int, repeats: int) -> list:
    base = random_model(shape)
    first = speed(base, stream, new_tokens, repeats)
    rows = [{"shape": shape, "variant": "bf16 (baseline)", **first, "resident_bytes": resident_bytes(base), "quantize_s": 0.0}]
    for scheme in BNB_SCHEMES:
        model, seconds = hfquant_variant(base, scheme, "bitsandbytes")
        rows.append({"shape": shape, "variant": f"hfquant bitsandbytes {scheme}", **speed(model, stream, new_tokens, repeats),
                     "resident_bytes": resident_bytes(model), "quantize_s": seconds})
        print(rows[-1], flush=True)
        del model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    last = speed(base, stream, new_tokens, repeats)
    fp = {k: (first[k] + last[k]) / 2 for k in first}
    rows[0].update(fp, first_last={"first": first, "last": last})
    for r in rows:
        r.update(decode_ratio=r["decode_tok_s"] / fp["decode_tok_s"], prefill_ratio=r["prefill_tok_s"] / fp["prefill_tok_s"],
                 resident_ratio=r["resident_bytes"] / rows[0]["resident_bytes"])
    return rows


def evaluation_batches(shape: str, stream: torch.Tensor) -> dict:
    model = random_model(shape)
    windows = evaluation_windows(stream, 512, 16)
    evaluator = registries().evaluators.get("perplexity")
    out = {"shape": shape, "windows": len(windows), "seq_len": 512}
    for label, ev in (("batch_size=1", evaluator(batch_size=1)), ("auto", evaluator())):
        ev.evaluate(model, windows)  # warm-up
        sync()
        t = time.perf_counter()
        result = ev.evaluate(model, windows)
        sync()
        out[label] = {"seconds": time.perf_counter() - t, "perplexity": result["perplexity"],
                      "windows_per_forward": ev.windows_per_forward(DEVICE, 512, model.config.vocab_size)}
        print(label, out[label], flush=True)
    return out


def pipeline_runs(shape: str, tokenizer: str, work: str) -> list:
    ckpt = os.path.join(work, f"random-{shape}")
    model = random_model(shape)
    model.save_pretrained(ckpt)
    for name in os.listdir(tokenizer):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tokenizer, name), ckpt)
    del model
    runs = []
    for label, extra in (("default recipe (algorithm=auto: awq, gptq)", []), ("algorithm=rtn", ["algorithm=rtn"])):
        out = os.path.join(work, "run-" + ("rtn" if extra else "default"))
        command = [sys.executable, "-m", "hfquant", "model=hub", f"model.path={ckpt}", f"model.name=random-{shape}",
                   f"device={DEVICE}", f"output_dir={out}", "overwrite=true", *extra]
        t = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-6000:], flush=True)
            runs.append({"run": label, "command": " ".join(command[1:]), "failed": done.returncode})
            continue
        report = json.load(open(os.path.join(out, "report.json")))
        runs.append({"run": label, "command": " ".join(command[1:]), "wall_s": wall, "timings": report["timings"],
                     "peak_memory": report["peak_memory"], "backend": report["run"]["backend"],
                     "algorithms": report["quantization"]["algorithms"]})
        print(runs[-1], flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-360m,smollm2-1.7b")
    ap.add_argument("--pipeline-shape", default="smollm2-1.7b")
    ap.add_argument("--tokenizer", required=True, help="a folder with SmolLM2's tokenizer files (49152 tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timings per measurement; the median is reported")
    ap.add_argument("--work", default="/tmp/hfquant-bench-gpu")
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed, evaluation, pipeline")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (with --shapes tiny)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py measures CUDA paths and needs a CUDA device")
    skip = set(filter(None, args.skip.split(",")))
    stream = torch.randint(3, 49152, (16 * 512 + 1,), generator=torch.Generator().manual_seed(0))
    result = {"machine": {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None, "torch": torch.__version__, "cuda": torch.version.cuda,
                          "cpus": os.cpu_count()}, "speed": [], "evaluation": None, "pipeline": []}
    save = lambda: json.dump(result, open(args.out, "w"), indent=2, default=str)  # noqa: E731 — kept after every part
    if "speed" not in skip:
        for shape in args.shapes.split(","):
            result["speed"] += speed_rows(shape, stream, args.new_tokens, args.repeats)
            save()
    if "evaluation" not in skip:
        result["evaluation"] = evaluation_batches(args.pipeline_shape, stream)
        save()
    if "pipeline" not in skip:
        os.makedirs(args.work, exist_ok=True)
        result["pipeline"] = pipeline_runs(args.pipeline_shape, args.tokenizer, args.work)
        save()
    print("\n| shape | variant | decode tok/s | ×bf16 | prefill tok/s | ×bf16 | resident MB | ×bf16 | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["speed"]:
        print(f"| {r['shape']} | {r['variant']} | {r['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} | {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_ratio']:.2f} | {r['resident_bytes'] / 1e6:.0f} | {r['resident_ratio']:.2f} | {r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main()
