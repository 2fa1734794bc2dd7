"""Quantize the embedded model with one peer library and score it on the shared windows (run in that peer's
venv, never hfquant's): 4-bit weights; the fp32 baseline is scored by this script, in the peer's venv, on the
same windows (cached in --baseline-cache per model, windows and torch/transformers versions).

  llmc-gptq   llm-compressor GPTQModifier, int4 sym, calibrated on the `calibration` windows
  llmc-rtn    llm-compressor QuantizationModifier (round to nearest), int4 sym, data-free
  hqq         HQQ's half-quadratic optimisation of scale/zero, int4 asym (HQQ's own recipe), data-free
  autoround   AutoRound (sign-gradient rounding), int4 sym, calibrated on the `calibration` windows
  nf4         bitsandbytes NF4 through transformers' BitsAndBytesConfig (its fixed blocks of 64)

lm_head (tied to the embeddings) stays float everywhere, as in hfquant. quant_seconds (wall) and
quant_cpu_seconds (this process's CPU time, steadier on shared cores) time the quantization step alone:
calibration passes included, loading and evaluation not. Perplexity: scripts/peers/ppl.py.
Usage: VENV/bin/python scripts/peers/peer_quantize.py --peer hqq --group-size 64 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppl import perplexity  # noqa: E402

PACKAGES = {"llmc-gptq": ["llmcompressor", "compressed-tensors"], "llmc-rtn": ["llmcompressor", "compressed-tensors"],
            "hqq": ["hqq"], "autoround": ["auto-round"], "nf4": ["bitsandbytes"]}


class Timer:
    """Wall and CPU seconds of a block (CPU time too: this machine's 2 cores are shared, wall time is noisy)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def max_levels(model, group_size: int, flat: bool = False) -> int:
    """Most distinct values in any group of the first Linear's weight (≤ 16 once it holds 4-bit codes). Groups
    are runs of columns within a row, or with `flat` runs of the row-major flattened weight (HQQ's layout)."""
    w = dict(model.named_modules())[linear_names(model)[0]].weight.detach()
    if flat:
        groups = w.reshape(-1, group_size)
    else:
        cols = w.shape[1] - w.shape[1] % group_size  # whole groups only
        groups = w[:, :cols].reshape(-1, group_size)
    return max(len(torch.unique(g)) for g in groups[:4096])


def linear_names(model) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


@torch.no_grad()
def bake_fake_quantized(model) -> None:
    """llm-compressor leaves each Linear fake-quantizing its weight on every forward (status frozen): compute
    that weight once and switch the wrapper off — the same function, scored ~10× faster on CPU."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            module.weight.data = forward_quantize(module, module.weight.data, "weight", scheme.weights)
            module.quantization_enabled = False


def llmc(model, args, calib: torch.Tensor) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.peer == "llmc-gptq":
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01)
        data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        extra = dict(dataset=data, num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
                     shuffle_calibration_samples=False)
    else:
        recipe, extra = QuantizationModifier(config_groups=groups, ignore=["lm_head"]), {}
    with Timer() as t:
        oneshot(model=model, recipe=recipe, **extra)
    bake_fake_quantized(model)
    settings = {"scheme": "int4 symmetric, group", "recipe": type(recipe).__name__, "block_size": 128,
                "dampening_frac": 0.01, "actorder": "llm-compressor default (static)"} if args.peer == "llmc-gptq" \
        else {"scheme": "int4 symmetric, group", "recipe": type(recipe).__name__}
    if args.group_size == 64:
        settings["note"] = "llm-compressor refuses group 128 on 576 columns, so its rows run at group 64"
    return {"timer": t, "levels": max_levels(model, args.group_size), "settings": settings}


def hqq(model, args, calib) -> dict:
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    params = dict(hqq_base_quant_config(nbits=4, group_size=args.group_size, axis=args.hqq_axis)["weight_quant_params"])
    modules = dict(model.named_modules())
    with Timer() as t:
        for name in linear_names(model):
            w = modules[name].weight
            q, meta = Quantizer.quantize(w.data, **params, bitpack=False, compute_dtype=torch.float32, device="cpu")
            meta["compute_dtype"] = torch.float32
            w.data = Quantizer.dequantize(q, meta).to(w.dtype)  # fake-quantized: what HQQLinear computes with
    settings = {"scheme": "int4 asymmetric (HQQ: optimised scale and zero)",
                **{k: v for k, v in params.items() if k != "view_as_float"},
                "note": "groups are runs of the row-major weight (HQQ's axis=1 layout); at group 128 on 576 "
                        "columns a group can span two rows"}
    return {"timer": t, "levels": max_levels(model, args.group_size, flat=True), "settings": settings}


def autoround(model, args, calib, tokenizer) -> dict:
    from auto_round import AutoRound

    n = min(args.nsamples, len(calib))
    data = [{"input_ids": row[None, : args.seqlen], "attention_mask": torch.ones_like(row[None, : args.seqlen])}
            for row in calib[:n]]
    rounder = AutoRound(model, tokenizer, bits=4, group_size=args.group_size, sym=True, iters=args.iters,
                        nsamples=n, seqlen=args.seqlen, batch_size=args.batch_size, dataset=data, device_map="cpu",
                        amp=False, low_gpu_mem_usage=False, seed=0)
    with Timer() as t:
        model, _ = rounder.quantize()
    return {"timer": t, "model": model, "levels": max_levels(model, args.group_size),
            "settings": {"scheme": "int4 symmetric, group", "iters": args.iters, "nsamples": n, "seqlen": args.seqlen,
                         "batch_size": args.batch_size, "calibration": "the shared calibration windows"}}


def nf4(args) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=False, bnb_4bit_quant_storage=torch.uint8)
    with Timer() as t:  # bitsandbytes quantizes while loading: load time stands for quant time
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=torch.float32,
                                                     device_map="cpu")
    return {"timer": t, "model": model,
            "settings": {"scheme": "NF4 (bitsandbytes), absmax per block", "blocksize": 64,
                         "double_quant": False, "note": "bitsandbytes' 4-bit block size is fixed at 64 here; "
                                                       "quant_seconds includes loading the checkpoint"}}


def fp32_baseline(model, windows, sets, args) -> dict:
    """The float model's perplexity on each set, computed by this script; kept per (model, windows, torch and
    transformers versions) in --baseline-cache so the six runs on two shared cores pay for it twice, not six times."""
    from transformers import __version__ as tf_version

    key = "|".join([os.path.abspath(args.model), torch.__version__, tf_version]
                   + [windows[k]["token_sha256"] for k in sets])
    cache = {}
    if args.baseline_cache and os.path.isfile(args.baseline_cache):
        with open(args.baseline_cache) as f:
            cache = json.load(f)
    if key not in cache:
        cache[key] = {k: perplexity(model, windows[k]["input_ids"]) for k in sets}
        if args.baseline_cache:
            tmp = f"{args.baseline_cache}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, args.baseline_cache)
    return cache[key]


def versions(peer: str) -> dict:
    names = ["torch", "transformers", "accelerate"] + PACKAGES[peer]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, choices=sorted(PACKAGES))
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--model", default="/work/peers/smollm2-fp32")
    parser.add_argument("--windows", default="/work/peers/windows.pt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-cache", default="/work/peers/results/fp32-baselines.json",
                        help="JSON file of fp32 perplexities this script computed; '' to recompute every time")
    parser.add_argument("--hqq-axis", type=int, default=1, help="HQQ grouping axis (1: along input columns)")
    parser.add_argument("--iters", type=int, default=200, help="AutoRound iterations (its default 200)")
    parser.add_argument("--nsamples", type=int, default=128, help="AutoRound samples (capped at the windows)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="AutoRound batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(args.windows, weights_only=True)
    calib = windows["calibration"]["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sets = ("in_domain", "out_of_domain")
    baseline = fp32_baseline(model, windows, sets, args)
    if args.peer.startswith("llmc"):
        result = llmc(model, args, calib)
    elif args.peer == "hqq":
        result = hqq(model, args, calib)
    elif args.peer == "autoround":
        result = autoround(model, args, calib, tokenizer)
    else:
        del model
        result = nf4(args)
    model = result.pop("model") if "model" in result else model
    ppl = {k: perplexity(model, windows[k]["input_ids"]) for k in sets}
    report = {
        "peer": args.peer, "group_size": args.group_size, "bits": 4,
        "settings": {**result["settings"], "group_size": args.group_size, "threads": args.threads,
                     "ignored": ["lm_head (tied to embed_tokens)"]},
        "versions": versions(args.peer), "quant_seconds": round(result["timer"].wall, 2),
        "quant_cpu_seconds": round(result["timer"].cpu, 2), "max_levels_per_group": result.get("levels"),
        "ppl": {k: ppl[k]["perplexity"] for k in sets}, "baseline_ppl": {k: baseline[k]["perplexity"] for k in sets},
        "scored_tokens": {k: ppl[k]["scored_tokens"] for k in sets},
        "ratio": {k: ppl[k]["perplexity"] / baseline[k]["perplexity"] for k in sets},
        "windows": {k: {"token_sha256": windows[k]["token_sha256"], "shape": windows[k]["shape"],
                        "source": windows[k]["source"]} for k in ("calibration",) + sets},
        "calibration_used": args.peer in ("llmc-gptq", "autoround"),
        "model": args.model,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("peer", "group_size", "quant_seconds", "ratio", "ppl", "baseline_ppl")}))


if __name__ == "__main__":
    main()
