"""QuantArgs validation and bit packing."""

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
