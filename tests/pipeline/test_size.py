"""The size report counts every quantized Linear kind: the `cpu` kernels and the `fake` reference save the same
tensors, so they report the same bits per quantized weight."""

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
