"""The size report counts every quantized Linear kind: the `cpu` kernels and the `fake` reference save the same
tensors, so they report the same bits per quantized weight; bitsandbytes' modules count what they save."""

import pytest

from hfquant.pipeline.run import run
from tests.conftest import compose, tiny_overrides


@pytest.mark.parametrize("scheme, bits", [("w8a16", 8), ("w4a16", 4)])
def test_cpu_and_fake_report_the_same_quantized_weight_size(tiny_llm_dir, tmp_path, scheme, bits):
    extra = ["scheme.weights.group_size=32"] if scheme == "w4a16" else []
    reports = {backend: run(compose(tiny_overrides(tiny_llm_dir, tmp_path / backend, f"scheme={scheme}",
                                                   f"backend={backend}", *extra)))["quantization"]
               for backend in ("cpu", "fake")}
    assert reports["cpu"]["quantized_weights"] == reports["fake"]["quantized_weights"] > 0
    assert reports["cpu"]["bits_per_quantized_weight"] == reports["fake"]["bits_per_quantized_weight"]
    # codes at `bits` plus one scale (and zero point) per row or group: a little above the code width
    assert bits < reports["cpu"]["bits_per_quantized_weight"] < bits + 2


@pytest.mark.parametrize("scheme, low, high", [("llm-int8", 8, 9), ("nf4", 4, 8)])
def test_bitsandbytes_reports_its_quantized_weights(tiny_llm_dir, tmp_path, scheme, low, high):
    q = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", f"scheme={scheme}",
                                   "backend=bitsandbytes")))["quantization"]
    # per layer: q/o 64×64, k/v 32×64 (2 KV heads), gate/up 160×64, down 64×160 — which nf4 leaves unquantized
    # (bitsandbytes' CPU 4-bit kernel cannot run it; see tests/test_bitsandbytes_cpu_limits.py)
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 160 * 64 + (64 * 160 if scheme == "llm-int8" else 0)
    assert q["quantized_weights"] == 2 * per_layer
    # int8 codes + one float32 scale per row; nf4 codes + absmax per 64, plus ~1.2 KB of code tables per Linear,
    # which weigh a lot on these tiny layers
    assert low < q["bits_per_quantized_weight"] < high
