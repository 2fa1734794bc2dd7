"""The streaming safetensors writer/reader against the safetensors library itself."""

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfquant.formats.safetensors_stream import DTYPE_CODES, SafetensorsReader, StreamingSafetensorsWriter


def _random_tensor(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def _random_state(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dtypes = list(DTYPE_CODES)
    state = {}
    for i in range(rng.randint(1, 12)):
        shape = tuple(rng.randint(0 if rng.random() < 0.1 else 1, 5) for _ in range(rng.randint(0, 3)))
        name = rng.choice(["model.layers.", "lm_head.", "a", "z.", "é."]) + str(i) + rng.choice([".weight", ".bias", "_scale"])
        state[name] = _random_tensor(rng.choice(dtypes), shape, gen)
    return state


@pytest.mark.parametrize("seed", range(25))
def test_streamed_file_is_byte_identical_to_save_file(tmp_path, seed):
    state = _random_state(seed)
    metadata = {"format": "pt"} if seed % 2 else None
    save_file(state, tmp_path / "ref.safetensors", metadata=metadata)
    items = list(state.items())
    random.Random(seed).shuffle(items)  # arrival order does not matter
    with StreamingSafetensorsWriter(str(tmp_path / "out.safetensors"), {n: (t.dtype, t.shape) for n, t in state.items()}, metadata) as w:
        for name, tensor in items:
            w.write(name, tensor)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_reader_returns_each_tensor_exactly(tmp_path):
    state = _random_state(3)
    state["big"] = torch.randn(300, 700)  # spans several pages, starts mid-page
    save_file(state, tmp_path / "x.safetensors")
    reader = SafetensorsReader(str(tmp_path / "x.safetensors"))
    assert set(reader.tensors) == set(state)
    for name, expected in load_file(tmp_path / "x.safetensors").items():
        got = reader.get(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got.view(torch.uint8) if got.numel() else got, expected.view(torch.uint8) if got.numel() else expected)


def test_writer_refuses_wrong_shapes_and_missing_tensors(tmp_path):
    path = str(tmp_path / "w.safetensors")
    w = StreamingSafetensorsWriter(path, {"a": (torch.float32, (2, 2)), "b": (torch.int8, (3,))})
    with pytest.raises(ValueError, match="promised"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written.*'b'"):
        w.close()
