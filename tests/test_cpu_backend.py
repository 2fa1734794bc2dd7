"""The `cpu` backend: integer kernels that equal the reference math, save in hfquant's format, and reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.config import ConfigError, validate
from hfquant.formats import QuantLinear
from hfquant.formats import kernels
from hfquant.formats.kernels import Int4WeightLinear, Int8DynamicLinear, Int8WeightLinear, kernel_group_size, kernel_module_for
from hfquant.pipeline.run import run
from hfquant.quant import QuantArgs, compute_qparams, min_max
from tests.conftest import compose, tiny_overrides

CASES = [
    (QuantArgs(num_bits=8, strategy="channel"), None, Int8WeightLinear, 5e-3),
    (QuantArgs(num_bits=4, strategy="group", group_size=128), None, Int4WeightLinear, 5e-3),
    (QuantArgs(num_bits=4, strategy="group", group_size=128, symmetric=False), None, Int4WeightLinear, 5e-3),
    (QuantArgs(num_bits=4, strategy="group", group_size=64, symmetric=False, signed=False), None, Int4WeightLinear, 5e-3),
    (QuantArgs(num_bits=8, strategy="channel"), QuantArgs(num_bits=8, strategy="token", dynamic=True), Int8DynamicLinear, 4e-3),
    (QuantArgs(num_bits=4, strategy="group", group_size=64, symmetric=False, float_zero_point=True), None, Int4WeightLinear, 5e-3),
]


@pytest.mark.parametrize("w_args, a_args, cls, tol", CASES, ids=["w8a16", "w4a16", "w4a16-asym", "w4-unsigned-g64", "w8a8", "w4-float-zero"])
def test_kernels_match_the_reference_and_keep_the_format(w_args, a_args, cls, tol):
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192)  # 576 = 4.5 groups of 128: the ragged case
    s, z = compute_qparams(*min_max(lin.weight, w_args), w_args)
    q = QuantLinear.from_linear(lin, w_args, s.bfloat16().float(), z, a_args)
    k = kernel_module_for(q)
    assert isinstance(k, cls)
    x = torch.randn(7, 576)
    ref = q(x)
    if getattr(k, "integer_mm", False):
        tol = 1e-5  # torch._int_mm's int32 sums are exact: only float rounding of the scales remains
    # bf16 activations (the "a16") cost ~2e-3 relative; w8a8's integer sums are exact with int8 dot products and
    # rounded to bf16 at decode without them (test_w8a8_without_int8_dot_products_gives_the_integer_sums).
    assert float((k(x) - ref).norm() / ref.norm()) < tol
    sd_q, sd_k = q.state_dict(), k.state_dict()
    assert set(sd_q) == set(sd_k) and all(torch.equal(sd_q[n], sd_k[n]) for n in sd_q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("w_args, a_args, cls, tol", CASES, ids=["w8a16", "w4a16", "w4a16-asym", "w4-unsigned-g64", "w8a8", "w4-float-zero"])
def test_a_cast_keeps_the_kernels_running_and_the_saved_scales_exact(w_args, a_args, cls, tol, dtype):
    """`model.half()` / `.to(dtype)` used to cast the kernels' bf16 scales (every kernel then failed) and the
    float32 scales a save writes; now buffers keep their dtypes and outputs follow the input's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192)
    s, z = compute_qparams(*min_max(lin.weight, w_args), w_args)
    k = kernel_module_for(QuantLinear.from_linear(lin, w_args, s.bfloat16().float(), z, a_args))
    x = torch.randn(7, 576)
    with torch.no_grad():
        before = k(x)
    saved = {n: t.clone() for n, t in k.state_dict().items()}
    buffer_dtypes = {n: b.dtype for n, b in k.named_buffers()}
    assert k.to(dtype) is k
    assert {n: b.dtype for n, b in k.named_buffers()} == buffer_dtypes
    with torch.no_grad():
        after = k(x.to(dtype))
    assert after.dtype == dtype and float((after.double() - before).norm() / before.norm()) < 1e-2
    assert all(torch.equal(saved[n], t) for n, t in k.state_dict().items() if n != "bias")  # the bias is a Parameter


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32], ids=["bf16-dot-products", "no-bf16-hardware"])
@pytest.mark.parametrize("case", [c for c in CASES if c[1] is None], ids=["w8a16", "w4a16", "w4a16-asym", "w4-unsigned-g64", "w4-float-zero"])
def test_prefill_rows_take_the_dense_path_with_the_same_numbers(case, dense_dtype, monkeypatch):
    """From DENSE_FROM_ROWS rows on, weight-only layers dequantize for one GEMM (torch's int-pack kernels are
    tuned for decode): both paths agree with the reference as closely as bf16 activations allow, on machines
    with and without bf16 dot products (the dense GEMM then runs in float32)."""
    monkeypatch.setattr(kernels, "_BF16_FAST", dense_dtype == torch.bfloat16)
    w_args, _, _, tol = case
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192)
    s, z = compute_qparams(*min_max(lin.weight, w_args), w_args)
    q = QuantLinear.from_linear(lin, w_args, s.bfloat16().float(), z)
    k = kernel_module_for(q)
    for rows in (1, kernels.DENSE_FROM_ROWS - 1, kernels.DENSE_FROM_ROWS, 300):
        x = torch.randn(1, rows, 576)
        ref, kernel, dense = q(x), k.kernel(x[0]) + lin.bias, k.dense(x[0]) + lin.bias
        assert float((k(x) - ref).norm() / ref.norm()) < tol, rows
        assert float((dense - kernel).norm() / ref.norm()) < tol, rows
    assert torch.equal(k(x), (k.dense(x[0]) + lin.bias).to(x.dtype)[None])  # 300 rows: the dense path ran
    whole = k.dense(x[0])
    monkeypatch.setattr(kernels, "DENSE_CHUNK", 576 * 50)  # 192 output rows in slices of 50: a large lm_head's path
    monkeypatch.setattr(kernels, "FLOAT_SLICE", 576 * 50)  # (int8 weights in float32 slice by this one)
    monkeypatch.setattr(kernels, "INT4_SLICE_BYTES", 576 * 50 * kernels.dense_dtype().itemsize)  # (int4 weights)
    sliced = k.dense(x[0])  # the same GEMM per slice: equal up to a bf16 rounding of a differently blocked sum
    assert sliced.shape == whole.shape and float((sliced - whole).abs().max()) <= 1e-2 * float(whole.abs().max())


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32], ids=["bf16-dot-products", "no-bf16-hardware"])
@pytest.mark.parametrize("case", [c for c in CASES if c[2] is Int4WeightLinear], ids=["w4a16", "w4a16-asym", "w4-unsigned-g64", "w4-float-zero"])
def test_int4_prefill_is_the_same_with_and_without_the_native_loop(case, dense_dtype, monkeypatch):
    """The dense path dequantizes int4 weights in one native pass where hfquant's C loops are built, with torch ops
    elsewhere: the same outputs bit for bit, whole and in slices of output rows — both ways slice at
    `INT4_SLICE_BYTES`, which the row slices each way receives show (a GEMM's last bits can depend on its width)."""
    from hfquant.quant import native

    if native.library() is None:
        pytest.skip("no C compiler here: only the torch-op path exists")
    monkeypatch.setattr(kernels, "_BF16_FAST", dense_dtype == torch.bfloat16)
    w_args = case[0]
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192)
    s, z = compute_qparams(*min_max(lin.weight, w_args), w_args)
    k = kernel_module_for(QuantLinear.from_linear(lin, w_args, s.bfloat16().float(), z))
    x = torch.randn(64, 576)
    native_rows, eager_rows = [], []  # (first row, row count) of each weight slice each way dequantized
    dequant, eager = native.dequant_int4, Int4WeightLinear.dequantize_eager

    def counted_native(packed, in_features, group, scales_zeros, row0, *a, **kw):  # only slices it produced
        out = dequant(packed, in_features, group, scales_zeros, row0, *a, **kw)
        if out is not None:  # (None: it declined, and the torch ops ran)
            native_rows.append((row0, packed.shape[0]))
        return out

    def counted_eager(self, packed, rows):
        eager_rows.append((rows.start or 0, packed.shape[0]))
        return eager(self, packed, rows)

    monkeypatch.setattr(native, "dequant_int4", counted_native)
    monkeypatch.setattr(Int4WeightLinear, "dequantize_eager", counted_eager)
    default_slice = kernels.INT4_SLICE_BYTES
    whole = k(x)
    assert native_rows == [(0, 192)] and not eager_rows  # the native loop ran, and did not decline
    slices = [(0, 50), (50, 50), (100, 50), (150, 42)]
    monkeypatch.setattr(kernels, "INT4_SLICE_BYTES", 576 * 50 * dense_dtype.itemsize)  # 192 rows in slices of 50
    native_rows.clear()
    sliced = k(x)
    assert native_rows == slices and not eager_rows
    monkeypatch.setenv("HFQUANT_NATIVE_KERNELS", "0")
    native_rows.clear()
    assert torch.equal(k(x), sliced) and eager_rows == slices and not native_rows
    monkeypatch.setattr(kernels, "INT4_SLICE_BYTES", default_slice)
    eager_rows.clear()
    assert torch.equal(k(x), whole) and eager_rows == [(0, 192)] and not native_rows


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_w8a8_without_int8_dot_products_gives_the_integer_sums(rows, monkeypatch):
    """A CPU without VNNI/AMX (where `torch._int_mm` is a scalar loop) sums w8a8's int8 x int8 products in float32:
    decode rows on the int8-weight kernel, whose bf16 output rounds each sum by at most 2**-8 of it; prefill rows as a
    float32 GEMM over the codes, the same integers exactly, also when a large output is computed in slices. Both
    layouts save the same tensors."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192)
    w_args, a_args = QuantArgs(num_bits=8, strategy="channel"), QuantArgs(num_bits=8, strategy="token", dynamic=True)
    s, z = compute_qparams(*min_max(lin.weight, w_args), w_args)
    q = QuantLinear.from_linear(lin, w_args, s.bfloat16().float(), z, a_args)
    x = torch.randn(rows, 576) * torch.linspace(0.1, 4.0, 576)
    monkeypatch.setattr(kernels, "_INT8_FAST", True)
    with_int_mm = kernel_module_for(q)
    integer = with_int_mm(x) - lin.bias
    monkeypatch.setattr(kernels, "_INT8_FAST", False)
    without = kernel_module_for(q)
    assert torch.equal(without.codes(), q.codes()) and torch.equal(with_int_mm.codes(), q.codes())
    assert torch.equal(with_int_mm.dense(x), with_int_mm.kernel(x))  # with int8 dot products dense is the kernel
    sd_a, sd_b = with_int_mm.state_dict(), without.state_dict()
    assert set(sd_a) == set(sd_b) and all(torch.equal(sd_a[n], sd_b[n]) for n in sd_a)
    summed = without(x) - lin.bias
    if rows < kernels.DENSE_FROM_ROWS:
        assert not torch.equal(summed, integer)  # the bf16 rounding is there: the kernel path ran
        assert bool(((summed - integer).abs() <= 2 ** -8 * integer.abs() + 1e-6).all())
    else:
        assert torch.equal(summed, integer)
        monkeypatch.setattr(kernels, "DENSE_CHUNK", 576 * 50)
        assert torch.equal(without(x) - lin.bias, integer)


def test_w8a8_per_token_codes_are_the_reference_codes_on_edge_tokens():
    """The kernels' per-token activation codes skip the reference's clamp (|x| <= amax keeps |x / s| <= 127 up to the
    roundings of amax / 127 and x / s): on tokens that sit exactly on their extremes, constant tokens, tiny, subnormal,
    zero and huge ones every code is inside [-127, 127], and wherever amax / 127 is not 0 they are the reference
    quantizer's codes and scale."""
    from hfquant.quant import dynamic_qparams, quantize

    a_args = QuantArgs(num_bits=8, strategy="token", dynamic=True)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(576, generator=g) * 10.0 ** e for e in range(-30, 31, 5)]
    tokens += [torch.full((576,), v) for v in (1.0, -1.0, 3e-38, -1e-45, 0.0, 3e38)]
    edge = torch.randn(576, generator=g)
    edge[0], edge[1] = edge.abs().max() * 1.0000001, -edge.abs().max() * 1.0000001  # both extremes, equal size
    tokens += [edge, torch.linspace(-127.5, 127.5, 576), torch.linspace(-1, 1, 576) * (1 + 2.0 ** -23)]
    x = torch.stack(tokens)
    codes, s_x = kernels._quantize_per_token(x)
    assert float(codes.abs().max()) == 127.0  # every token, the degenerate ones too
    # every token whose amax / 127 is not 0 in float32 (for those the reference uses scale 1 and codes 0, the
    # kernels the smallest normal: both outputs are 0)
    normal = x.abs().amax(dim=-1) / 127 > 0
    assert int(normal.sum()) == len(tokens) - 2
    scale, zp = dynamic_qparams(x[normal], a_args)
    assert torch.equal(s_x[normal], scale.reshape(-1, 1))
    assert torch.equal(codes[normal].to(torch.int8), quantize(x[normal], scale, zp, a_args).to(torch.int8))


def test_w8a8_on_a_cpu_without_int8_dot_products_says_so(monkeypatch, caplog):
    from hfquant.plan import ModulePlan, QuantPlan
    from hfquant_builtins.backends.cpu import CpuBackend

    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    w_args, a_args = QuantArgs(num_bits=8, strategy="channel"), QuantArgs(num_bits=8, strategy="token", dynamic=True)
    s, z = compute_qparams(*min_max(lin[0].weight, w_args), w_args)
    plan = QuantPlan(scheme=None, observer="minmax",
                     modules={"0": ModulePlan("0", w_args, weight_qparams=(s, z), input_args=a_args)})
    monkeypatch.setattr(kernels, "_INT8_FAST", False)
    with caplog.at_level("WARNING", logger="hfquant"):
        CpuBackend().convert(lin, plan)
    assert "no int8 dot-product instructions" in caplog.text and "w8a16" in caplog.text
    assert isinstance(lin[0], Int8DynamicLinear)


def test_resident_weight_bytes_drop():
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 576, bias=False)
    fp32 = lin.weight.numel() * 4
    for args, limit in ((QuantArgs(num_bits=4, strategy="group", group_size=128), 0.3), (QuantArgs(num_bits=8, strategy="channel"), 0.27)):
        s, z = compute_qparams(*min_max(lin.weight, args), args)
        k = kernel_module_for(QuantLinear.from_linear(lin, args, s.bfloat16().float(), z))
        resident = sum(b.numel() * b.element_size() for b in k.buffers())
        assert resident <= limit * fp32, (args, resident / fp32)


def test_kernel_group_tiles_ragged_rows():
    assert kernel_group_size(128, 576) == 64 and kernel_group_size(128, 1536) == 128 and kernel_group_size(32, 100) is None


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w4a16-asym", "w8a8"])
def test_cpu_backend_runs_saves_and_reloads_onto_the_kernels(tiny_llm_dir, tmp_path, scheme):
    out = tmp_path / "run"
    extra = ["scheme.weights.group_size=32"] if scheme.startswith("w4") else []
    report = run(compose(tiny_overrides(tiny_llm_dir, out, f"scheme={scheme}", "backend=cpu", *extra)))
    assert report["run"]["backend"] == "cpu" and report["reload_check"]["max_abs_logit_difference"] == 0.0
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["backend"] == "cpu"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model.model.layers[0].mlp.up_proj).__name__ in ("Int8WeightLinear", "Int4WeightLinear", "Int8DynamicLinear")
    assert report["quantized"]["perplexity"]["top1_agreement"] > 0.5
    card = (out / "model" / "README.md").read_text()
    snippet = card.split("## How to load it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "hfquant.compile_decoding(model)" in snippet
    scope = {}
    exec(snippet.replace("path/to/this/folder", str(out / "model")), scope)  # the card's snippet runs as written
    assert scope["model"].generation_config.cache_implementation == "static"
    half = scope["model"].to(torch.float16)  # transformers allows this cast (not .half()); the kernels keep running
    logits = half(torch.tensor([[1, 2, 3, 4]]), use_cache=False).logits
    assert logits.dtype == torch.float16 and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("overrides, message", [
    (["scheme=w8a8-static", "backend=cpu"], r"backend=cpu cannot run scheme 'w8a8-static'.*static activation scales are not supported.*Backends that can: fake"),
    (["scheme=w4a16", "scheme.weights.group_size=48", "backend=cpu"], r"multiple of 32.*Backends that can: fake"),
    (["scheme=w4a16", "scheme.weights.num_bits=2", "backend=cpu"], r"backend=cpu cannot run 2-bit weights .*widths it runs: 4, 8"),
])
def test_cpu_backend_refuses_what_it_cannot_run_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["output_dir=/tmp/x", *overrides]))
