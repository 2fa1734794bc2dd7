"""hfquant's own CUDA paths (bitsandbytes' are in test_bitsandbytes_backend.py): the default recipe's math, batched
evaluation and a whole run with `device=cuda` agree with the CPU. Every test skips cleanly without CUDA."""

import json

import pytest
import torch

from hfquant.pipeline.run import run
from hfquant.quant import QuantArgs
from tests.algorithms.test_gptq import correlated_inputs, hessian_of, output_error, run as gptq, weight
from tests.conftest import compose, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

G32_ASYM_FZ = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32, float_zero_point=True)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_on_cuda_chooses_the_codes_the_cpu_chooses(act_order):
    """Same inputs, same math: only float summation order differs, so nearly every code agrees and the output
    error is the same to a fraction of a percent."""
    w, x = weight(64, 256), correlated_inputs(256, tokens=2048)
    on_cpu = gptq(w, hessian_of(x), G32_ASYM_FZ, act_order)
    on_cuda = [t.cpu() for t in gptq(w.cuda(), hessian_of(x.cuda()), G32_ASYM_FZ, act_order)[:3]]
    assert (on_cuda[0] == on_cpu[0]).float().mean() >= 0.99
    cpu_error, cuda_error = output_error(w, *on_cpu[:3], G32_ASYM_FZ, x), output_error(w, *on_cuda, G32_ASYM_FZ, x)
    assert cuda_error == pytest.approx(cpu_error, rel=0.01)


def test_batched_evaluation_on_cuda_gives_the_numbers_of_one_window_at_a_time(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    from hfquant.pipeline.data import evaluation_windows
    from hfquant.plugins import registries

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval().cuda()
    windows = evaluation_windows(torch.randint(2, model.config.vocab_size, (9 * 64,)), seq_len=64, max_windows=None)
    evaluator = registries().evaluators.get("perplexity")
    auto, one = evaluator(), evaluator(batch_size=1)
    assert auto.windows_per_forward("cuda:0", 64, model.config.vocab_size) == 8
    batched, single = auto.evaluate(model, windows), one.evaluate(model, windows)
    assert batched["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5)


def test_default_recipe_runs_on_cuda_and_matches_the_cpu_run(tiny_llm_dir, tmp_path):
    """AWQ then GPTQ on `device=cuda`: the folder reloads exactly, CUDA memory is reported, and quality is the
    CPU run's (same calibration windows; codes can differ only by float summation order)."""
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        reports[device] = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "algorithm=[awq,gptq]",
                                                     "calibration=pydoc", "backend=fake", f"device={device}")))
        assert json.loads((out / "report.json").read_text())["run"]["pipeline"] == "in_memory"
    cuda = reports["cuda"]
    assert cuda["reload_check"]["max_abs_logit_difference"] <= 1e-3
    assert cuda["peak_memory"]["cuda_bytes"] > 0
    ratio = {d: r["quantized"]["perplexity"]["perplexity"] / r["baseline"]["perplexity"]["perplexity"]
             for d, r in reports.items()}
    assert ratio["cuda"] == pytest.approx(ratio["cpu"], rel=0.02)


def test_signround_learns_on_cuda_and_keeps_its_codes_on_the_layer_device():
    """The layer, its inputs and every learnt tensor on the GPU (the window order's generator stays on the CPU);
    the codes beat round-to-nearest there as on the CPU."""
    from hfquant_builtins.algorithms.rtn import RoundToNearest
    from hfquant_builtins.algorithms.signround import SignRound
    from tests.algorithms.test_signround import run_layer

    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16, full_range=True)
    _, rtn_error, inputs = run_layer(RoundToNearest(), args, device="cuda")
    ctx, error, _ = run_layer(SignRound(iters=60, batch_size=2), args, inputs, device="cuda")
    assert all(mp.weight_codes.device.type == "cuda" for mp in ctx.plans.values())
    assert error < 0.8 * rtn_error
