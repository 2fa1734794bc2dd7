"""hfquant's compiled quantization loops give the eager path's codes bit for bit, its min / max exactly, its error sums
to float rounding — on this CPU's build and on the portable (no AVX2) build — and runs fall back to the eager path
when no compiler is there."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from hfquant.observer import Observer
from hfquant.quant import QuantArgs, compute_qparams, native, pack, quantize, quantize_with_error, unpack
from hfquant.quant.qparams import min_max

ARGS = {
    "int4 sym full-range g128": QuantArgs(num_bits=4, strategy="group", group_size=128, full_range=True),
    "int4 sym restricted g64": QuantArgs(num_bits=4, strategy="group", group_size=64),
    "int4 asym g96": QuantArgs(num_bits=4, strategy="group", group_size=96, symmetric=False, signed=False),
    "int4 asym float zero g32": QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False, signed=False,
                                          float_zero_point=True),
    "int8 sym channel": QuantArgs(num_bits=8, strategy="channel"),
    "uint8 asym channel": QuantArgs(num_bits=8, strategy="channel", symmetric=False, signed=False),
    "int3 asym g32": QuantArgs(num_bits=3, strategy="group", group_size=32, symmetric=False, signed=False),
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{name: library}: this CPU's build (what runs use) and a portable one without -march=native: its scalar loops,
    and float16 converted without the compiler's `_Float16` (as on compilers that lack it)."""
    lib = native.library()
    if lib is None:
        pytest.skip("no C compiler here: the eager path runs (tested below)")
    portable = [f for f in native.FLAGS if f != "-march=native"] + ["-DHFQ_SOFT_HALF"]  # float16 converted by hand
    return {"native": lib, "portable": native._load(native._build(portable, str(tmp_path_factory.mktemp("portable"))))}


def weight(rows, cols, dtype, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[1] = 0.0  # an all-zero row: scale 1, codes at the zero point
    w[2, :5] = torch.tensor([1e-3, -1e-3, 0.5, -0.5, 0.0])  # outliers (one group's range) and a zero
    w[3] = w[3].round(decimals=2)  # many equal values (ties are tested exactly below)
    w[4, :3] = torch.tensor([6e-8, -3e-6, 6e4])  # float16 subnormals and its near-largest value
    return w.to(dtype)


def eager(monkeypatch, fn, *a):
    monkeypatch.setenv("HFQUANT_NATIVE_KERNELS", "0")
    try:
        return fn(*a)
    finally:
        monkeypatch.delenv("HFQUANT_NATIVE_KERNELS")


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ARGS))
@pytest.mark.parametrize("cols", [1001, 256, 7])
def test_same_numbers_as_the_eager_path(builds, monkeypatch, build, dtype, name, cols):
    args, lib = ARGS[name], builds[build]
    w = weight(37, cols, dtype)
    lo, hi = min_max(w, args)  # the eager reduction
    fused = native.min_max(w, args, lib)
    assert fused is not None
    assert torch.equal(fused[0], lo) and torch.equal(fused[1], hi)
    scale, zero_point = compute_qparams(lo, hi, args)
    codes, error, energy = eager(monkeypatch, quantize_with_error, w, scale, zero_point, args)
    f_codes, f_error, f_energy = native.codes_with_error(w, scale, zero_point, args, codes.dtype, lib)
    assert f_codes.dtype == codes.dtype and torch.equal(f_codes, codes)
    assert f_error == pytest.approx(error, rel=1e-5) and f_energy == pytest.approx(energy, rel=1e-5)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("name", ["int4 sym full-range g128", "int4 asym g96", "int2 sym", "uint2 asym",
                                  "int8 sym channel", "uint8 asym channel"])
@pytest.mark.parametrize("cols", [1001, 256, 70, 3])
def test_packs_the_same_bytes(builds, monkeypatch, build, name, cols):
    args = ARGS.get(name) or QuantArgs(num_bits=2, strategy="group", group_size=32, symmetric=name == "int2 sym",
                                       signed=name == "int2 sym")
    codes = torch.randint(args.qmin, args.qmax + 1, (23, cols), generator=torch.Generator().manual_seed(cols),
                          dtype=torch.int16).to(torch.int8 if args.signed else torch.uint8)
    expected = eager(monkeypatch, pack, codes, args)
    packed = torch.full_like(expected, 0xAB)  # padding must be written, not left over
    assert native.pack(codes, args, args.num_bits, packed, builds[build])
    assert torch.equal(packed, expected)
    assert torch.equal(unpack(packed, args, cols), codes)


def test_runs_use_it_and_threads_split_the_rows_the_same(builds, monkeypatch):
    """`quantize` / `quantize_with_error` / the min-max observer take the compiled path (large weight, row split
    over threads) and agree with the eager path and with one thread."""
    args = ARGS["int4 sym full-range g128"]
    w = weight(1100, 576, torch.bfloat16, seed=1)
    observer = Observer(args)
    observer.observe(w)
    scale, zero_point = observer.qparams()
    assert native.min_max(w, args) is not None and native.codes_with_error(w, scale, zero_point, args, torch.int8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = quantize_with_error(w, scale, zero_point, args)
        torch.set_num_threads(1)
        one = quantize_with_error(w, scale, zero_point, args)
    finally:
        torch.set_num_threads(threads)
    reference = eager(monkeypatch, quantize_with_error, w, scale, zero_point, args)
    assert torch.equal(two[0], reference[0]) and torch.equal(one[0], reference[0])
    assert torch.equal(quantize(w, scale, zero_point, args), reference[0])
    assert two[1] == pytest.approx(reference[1], rel=1e-5) and one[1] == pytest.approx(two[1], rel=1e-12)
    calls = []
    monkeypatch.setattr(native, "codes_with_error", lambda *a, **k: calls.append(1))  # returns None: eager runs
    assert torch.equal(quantize(w, scale, zero_point, args), reference[0]) and calls


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_left_to_the_eager_path(builds, build, dtype, bad):
    args = ARGS["int4 asym g96"]
    w = weight(20, 300, dtype)
    scale, zero_point = torch.ones(20, 4), torch.ones(20, 4, dtype=torch.int32)
    assert native.codes_with_error(w, scale, zero_point, args, torch.uint8, builds[build]) is not None
    w[7, 250] = bad
    assert native.min_max(w, args, builds[build]) is None
    assert native.codes_with_error(w, scale, zero_point, args, torch.uint8, builds[build]) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_weights_are_refused_by_name(dtype):
    """What the user sees, compiled loops or not."""
    args = ARGS["int4 asym g96"]
    w = weight(20, 300, dtype)
    w[7, 250] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(1 of 6000 values\)"):
        Observer(args).observe(w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_with_error(w, torch.ones(20, 4), torch.zeros(20, 4, dtype=torch.int32), args)


def test_ties_round_half_to_even(builds, monkeypatch):
    """x/s exactly on k + ½ (s a power of two): half to even, as torch.round — not away from zero — with integer
    and float zero points."""
    ties = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -3.5] * 4).reshape(1, 32) * 0.25
    for args, zero, half_to_even in [
            (ARGS["int4 sym full-range g128"], torch.zeros(1, 1, dtype=torch.int32), [0, 0, 2, -2, 2, -2, 4, -4]),
            (ARGS["int4 asym g96"], torch.full((1, 1), 8, dtype=torch.int32), [8, 8, 10, 6, 10, 6, 12, 4]),
            (ARGS["int4 asym float zero g32"], torch.full((1, 1), 7.0), [8, 6, 8, 6, 10, 4, 10, 4])]:  # 7.5, 6.5, …
        expected = eager(monkeypatch, quantize, ties, torch.full((1, 1), 0.25), zero, args)
        assert expected[0, :8].tolist() == half_to_even
        for lib in builds.values():
            fused = native.codes_with_error(ties, torch.full((1, 1), 0.25), zero, args, expected.dtype, lib)
            assert torch.equal(fused[0], expected)


def test_what_it_does_not_take_stays_eager(builds):
    args = ARGS["int4 sym full-range g128"]
    w = weight(8, 256, torch.float32)
    scale, zero = torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.int32)
    assert native.codes_with_error(w, scale, zero, args, torch.int8) is not None  # the baseline the rest differs from
    offset = weight(9, 256, torch.float32)[1:]  # contiguous, with a storage offset: taken, same codes
    assert torch.equal(native.codes_with_error(offset, scale, zero, args, torch.int8)[0],
                       native.codes_with_error(offset.clone(), scale, zero, args, torch.int8)[0])
    assert native.codes_with_error(w.double(), scale, zero, args, torch.int8) is None  # float64 reference math
    assert native.codes_with_error(w, scale.double(), zero, args, torch.int8) is None
    assert native.codes_with_error(torch.empty(256, 8).t(), scale, zero, args, torch.int8) is None  # not contiguous
    assert native.codes_with_error(w, scale[:, :1], zero[:, :1], args, torch.int8) is None  # per-row scale
    assert native.codes_with_error(w, scale, zero, args, torch.int16) is None
    assert native.codes_with_error(w, scale.to("meta"), zero, args, torch.int8) is None  # qparams elsewhere
    assert native.codes_with_error(w, torch.zeros(8, 2), zero, args, torch.int8) is None  # a zero scale
    assert native.codes_with_error(w, scale, zero + 0.5, ARGS["int4 asym g96"], torch.uint8) is None  # not integer
    assert native.min_max(w[0], args) is None  # 1-D
    assert native.min_max(w, QuantArgs(num_bits=8, strategy="tensor")) is None
    codes = torch.zeros(8, 256, dtype=torch.int8)
    assert not native.pack(codes, args, 4, torch.empty(8, 64, dtype=torch.uint8))  # wrong packed shape
    assert not native.pack(codes, args, 4, torch.empty(8, 128, dtype=torch.int8))


def test_no_compiler_means_the_eager_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    args = ARGS["int8 sym channel"]
    w = weight(40, 64, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="hfquant"):
        assert native.library() is None
        lo, hi = min_max(w, args)
        codes = quantize(w, *compute_qparams(lo, hi, args), args)
    assert codes.shape == (40, 64)
    assert "native kernels are unavailable (no C compiler" in caplog.text
    assert not os.path.exists(tmp_path / "cache" / "native")  # nothing written


def test_a_failed_build_leaves_no_file(monkeypatch, tmp_path):
    folder = tmp_path / "native"
    with pytest.raises(RuntimeError, match="failed"):
        native._build(native.FLAGS + ["-Wl,--no-such-linker-option"], str(folder))
    assert list(folder.iterdir()) == []


def fresh_loader(monkeypatch, cache):
    monkeypatch.setenv("HFQUANT_CACHE", str(cache))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)


def test_a_cache_others_can_write_is_not_loaded_from(builds, monkeypatch, tmp_path):
    """A library someone else could have planted is never loaded: with a shared (group/other-writable) cache the
    kernels are built privately for the process and nothing is written to the shared folder."""
    shared = tmp_path / "shared"
    (shared / "native").mkdir(parents=True)
    os.chmod(shared / "native", 0o777)
    fresh_loader(monkeypatch, shared)
    lib = native.library()
    assert lib is not None and lib is not builds["native"]
    assert list((shared / "native").iterdir()) == []


def test_a_damaged_cached_library_is_built_again(builds, monkeypatch, tmp_path):
    fresh_loader(monkeypatch, tmp_path / "cache")
    path = native._build(folder=str(tmp_path / "cache" / "native"))
    with open(path, "wb") as f:
        f.write(b"not a library")
    fresh_loader(monkeypatch, tmp_path / "cache")
    lib = native.library()
    w = weight(30, 64, torch.float32)
    assert lib is not None and native.min_max(w, ARGS["int8 sym channel"], lib) is not None


def dequant_reference(packed, cols, group, scales_zeros, row0, dtype):
    """The int4 kernel's rule in float32 torch ops: (q − 8)·scale + zero per group, then `dtype`."""
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :cols].float() - 8
    index = torch.arange(cols) // group
    sz = scales_zeros[:, row0:row0 + packed.shape[0]].float()  # (groups, rows, 2)
    return (q * sz[index, :, 0].t() + sz[index, :, 1].t()).to(dtype)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols, group", [(576, 64), (1001, 128), (256, 256), (7, 8), (96, 32), (1001, 1001),
                                         (4096, 4096)])
def test_int4_dequantization_gives_the_kernels_values_bit_for_bit(builds, build, dtype, cols, group):
    """The prefill path's dequantization: every nibble of every byte, ragged last groups (odd ones too), scales of any
    sign and size — equal to the float32 ops and their rounding to bfloat16, on this CPU's build and the portable one;
    rows taken from the middle of the weight read their own (scale, zero) pairs."""
    g = torch.Generator().manual_seed(cols)
    rows, groups = 37, -(-cols // group)
    packed = torch.randint(0, 256, (rows, -(-cols // 2)), dtype=torch.uint8, generator=g)
    packed[0] = torch.arange(packed.shape[1]) % 256  # every byte value
    scales_zeros = (torch.randn(groups, rows + 5, 2, generator=g) * torch.logspace(-6, 3, rows + 5)[None, :, None])
    scales_zeros = scales_zeros.to(torch.bfloat16).contiguous()
    for row0, part in [(0, packed), (5, packed[:30])]:
        expected = dequant_reference(part, cols, group, scales_zeros, row0, dtype)
        got = native.dequant_int4(part.contiguous(), cols, group, scales_zeros, row0, dtype, builds[build])
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # compared as bit patterns
        assert got.dtype == dtype and torch.equal(got.view(bits), expected.view(bits))


def test_int4_dequantization_splits_rows_across_threads_the_same(builds, monkeypatch):
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (301, 288), dtype=torch.uint8, generator=g)
    scales_zeros = torch.randn(9, 301, 2, generator=g).to(torch.bfloat16)
    one = native.dequant_int4(packed, 576, 64, scales_zeros, 0, torch.bfloat16)
    monkeypatch.setattr(native, "THREADS_FROM", 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert torch.equal(native.dequant_int4(packed, 576, 64, scales_zeros, 0, torch.bfloat16), one)
    finally:
        torch.set_num_threads(threads)


def test_int4_dequantization_declines_what_it_does_not_take(builds):
    packed = torch.zeros(4, 288, dtype=torch.uint8)
    sz = torch.ones(9, 4, 2, dtype=torch.bfloat16)
    assert native.dequant_int4(packed, 576, 64, sz, 0, torch.float32) is not None  # the baseline the rest differs from
    assert native.dequant_int4(packed, 576, 64, sz, 0, torch.float16) is None  # an output dtype it does not write
    assert native.dequant_int4(packed, 576, 64, sz.float(), 0, torch.float32) is None  # float32 pairs
    assert native.dequant_int4(packed, 574, 64, sz, 0, torch.float32) is None  # packed width of another row length
    assert native.dequant_int4(packed, 576, 64, sz, 1, torch.float32) is None  # rows past the pairs' end
    assert native.dequant_int4(packed, 576, 32, sz, 0, torch.float32) is None  # pairs for another group count
    assert native.dequant_int4(packed, 576, 64, torch.ones(9, 4, 3, dtype=torch.bfloat16), 0, torch.float32) is None
    assert native.dequant_int4(packed.t().contiguous().t(), 576, 64, sz, 0, torch.float32) is None  # not contiguous
    assert native.dequant_int4(packed, 576, 1, torch.ones(576, 4, 2, dtype=torch.bfloat16), 0, torch.float32) is None
    odd = torch.ones(10, 4, 2, dtype=torch.bfloat16)
    assert native.dequant_int4(packed, 576, 63, odd, 0, torch.float32) is None  # groups that start mid-byte
    whole_row = torch.ones(1, 4, 2, dtype=torch.bfloat16)
    assert native.dequant_int4(packed, 576, 1024, whole_row, 0, torch.float32) is not None  # one group: the row
    assert native.dequant_int4(packed, 576, 0, sz, 0, torch.float32) is None  # no groups at all: declined, no raise


@pytest.mark.parametrize("build", ["native", "portable"])
def test_int4_dequantization_library_refuses_what_its_wrapper_would(builds, build):
    """The C entry point checks its own arguments too (status 2, nothing written): a caller that skips the Python
    wrapper cannot make it read past the (scale, zero) pairs or start a group mid-byte."""
    lib = builds[build]
    packed = torch.zeros(4, 288, dtype=torch.uint8)
    sz = torch.ones(10, 4, 2, dtype=torch.bfloat16)
    out = torch.full((4, 576), 7.0)

    def status(group, sz_rows, row0, rows=4):
        return lib.hfq_dequant_int4(packed.data_ptr(), rows, 576, group, sz.data_ptr(), sz_rows, row0, 0,
                                    out.data_ptr(), 1)

    assert status(64, 4, 0) == 0 and torch.equal(out, torch.full((4, 576), -7.0))  # (0 − 8)·1 + 1
    out.fill_(7.0)
    assert status(63, 4, 0) == 2  # odd groups that start mid-byte
    assert status(1, 4, 0) == 2
    assert status(64, 4, 1) == 2  # rows 1..4 of 4 pairs
    assert status(64, 4, -1) == 2
    assert status(64, 4, 0, rows=-1) == 2
    assert torch.equal(out, torch.full((4, 576), 7.0))  # nothing written
