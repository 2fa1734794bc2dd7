"""QuantArgs validation and bit packing."""

import importlib

import pytest
import torch

from hfquant.quant import QuantArgs, QuantArgsError, compute_qparams, min_max, pack, quantize, storage_bits, unpack


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_bits=1), "num_bits"),
        (dict(num_bits=9), "num_bits"),
        (dict(num_bits=4.0), "num_bits"),
        (dict(strategy="row"), "strategy"),
        (dict(strategy="group"), "group_size"),
        (dict(strategy="group", group_size=0), "group_size"),
        (dict(strategy="channel", group_size=128), "group_size"),
        (dict(strategy="token"), "dynamic"),
        (dict(observer="Min Max"), "observer"),
    ],
)
def test_invalid_args_name_the_field(kwargs, field):
    with pytest.raises(QuantArgsError, match=field):
        QuantArgs(**kwargs)


def test_ranges_signed_and_unsigned():
    assert (QuantArgs(num_bits=4).qmin, QuantArgs(num_bits=4).qmax) == (-8, 7)
    assert (QuantArgs(num_bits=4, signed=False).qmin, QuantArgs(num_bits=4, signed=False).qmax) == (0, 15)
    assert (QuantArgs(num_bits=2).qmin, QuantArgs(num_bits=2).qmax) == (-2, 1)


def test_dict_round_trip_and_unknown_field():
    args = QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False)
    assert QuantArgs.from_dict(args.to_dict()) == args
    with pytest.raises(QuantArgsError, match="bitz"):
        QuantArgs.from_dict({"bitz": 4})


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("cols", [1, 7, 128, 130])
def test_pack_unpack_round_trip(bits, signed, cols):
    args = QuantArgs(num_bits=bits, signed=signed, symmetric=False)
    q = torch.randint(args.qmin, args.qmax + 1, (3, cols), dtype=torch.int16).to(torch.int8 if signed else torch.uint8)
    packed = pack(q, args)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, -(-cols * bits // 8))
    assert torch.equal(unpack(packed, args, cols), q)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    args = QuantArgs(num_bits=4, signed=False, symmetric=False)
    packed = pack(torch.tensor([[1, 2, 15]], dtype=torch.uint8), args)
    assert packed.tolist() == [[0x21, 0x0F]]


def test_three_bits_have_no_packed_format():
    with pytest.raises(ValueError, match="allowed: 2, 4, 8"):
        storage_bits(3)


def test_ragged_group_qparams_shape():
    w = torch.randn(4, 576)
    args = QuantArgs(num_bits=4, strategy="group", group_size=128)
    scale, zp = compute_qparams(*min_max(w, args), args)
    assert scale.shape == (4, 5)  # 4 full groups + one of 64 columns
    q = quantize(w, scale, zp, args)
    assert q.shape == w.shape


def _pack_by_definition(q: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Byte j holds codes j*per_byte … (j+1)*per_byte − 1, offset by −qmin, low bits first (the format's rule)."""
    u = (q.to(torch.int16) - args.qmin).tolist()
    per_byte = 8 // args.num_bits
    rows = []
    for row in u:
        row = row + [0] * ((-len(row)) % per_byte)
        rows.append([sum(c << (args.num_bits * i) for i, c in enumerate(row[j:j + per_byte]))
                     for j in range(0, len(row), per_byte)])
    return torch.tensor(rows, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("cols", [6, 7, 64])
def test_pack_in_row_chunks_into_a_given_buffer_matches_the_definition(monkeypatch, bits, signed, cols):
    """The row-chunked, word-wide packing (chunks forced small here) writes the same bytes as the format's rule,
    into `out` when given, across chunk boundaries and odd lengths."""
    pack_mod = importlib.import_module("hfquant.quant.packing")  # the module
    monkeypatch.setattr(pack_mod, "CHUNK_CODES", 3 * cols)  # 3 rows per chunk: 11 rows cross three boundaries
    args = QuantArgs(num_bits=bits, signed=signed, symmetric=False)
    q = torch.randint(args.qmin, args.qmax + 1, (11, cols), generator=torch.Generator().manual_seed(bits + cols),
                      dtype=torch.int16).to(torch.int8 if signed else torch.uint8)
    expected = _pack_by_definition(q, args)
    assert torch.equal(pack(q, args), expected)
    out = torch.full(expected.shape, 0xAA, dtype=torch.uint8)
    assert pack(q, args, out=out) is out and torch.equal(out, expected)
    transposed = q.t().contiguous().t()  # the same codes with column-major strides (how kernels hold some)
    assert torch.equal(pack(transposed, args), expected)
    with pytest.raises(ValueError, match="contiguous uint8 tensor of shape"):
        pack(q, args, out=torch.empty(expected.shape[0], expected.shape[1] + 1, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scheme", ["sym-full", "sym-restricted", "asym"])
def test_quantize_with_error_leaves_the_weight_alone_and_matches_quantize(dtype, scheme):
    """x/s is computed in place only in the float copy that quantize_with_error made itself: a float32 weight (no
    copy needed) must come back unchanged; codes equal `quantize`'s and the error is that of the dequantized codes."""
    from hfquant.quant import dequantize, quantize_with_error

    args = {"sym-full": QuantArgs(num_bits=4, strategy="group", group_size=64, full_range=True),
            "sym-restricted": QuantArgs(num_bits=8, strategy="channel"),
            "asym": QuantArgs(num_bits=4, strategy="group", group_size=64, symmetric=False)}[scheme]
    w = torch.randn(300, 1000, generator=torch.Generator().manual_seed(1)).to(dtype)  # > one row chunk, ragged groups
    before = w.clone()
    scale, zp = compute_qparams(*min_max(w, args), args)
    codes, error, energy = quantize_with_error(w, scale, zp, args)
    assert torch.equal(w, before)
    assert torch.equal(codes, quantize(w, scale, zp, args))
    x = w.double()
    assert error == pytest.approx(float((dequantize(codes, scale, zp, args, torch.float64) - x).pow(2).sum()), rel=1e-4)
    assert energy == pytest.approx(float(x.pow(2).sum()), rel=1e-5)
