"""`model.allow_pickle=true` in the streaming pipeline: pickle (.bin) checkpoints stream under the loader's rule
(weights_only, memory-mapped, one file at a time) to the same bytes as the in-memory path; without consent
both pipelines refuse with the same message; a checkpoint streaming cannot read sends `pipeline=auto` to the
in-memory loader, and `pipeline=streaming` is refused with the real reason before any output is written."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hfquant.pipeline.load import ModelNotFoundError
from hfquant.pipeline.run import run
from hfquant.pipeline.streaming import StreamingError, TensorSource, checkpoint_files
from tests.conftest import compose

QUIET = ["calibration=none", "algorithm=rtn", "evaluation=none", "scheme=w8a16", "backend=cpu"]


def _overrides(model_dir, out, *extra):
    return ["model=hub", f"model.path={model_dir}", f"output_dir={out}", *QUIET, *extra]


def _pickle_copy(tiny_llm_dir, dest, shards=1, legacy=False):
    """The tiny model as a pickle checkpoint (`torch.save` of its state dict, as older transformers wrote it)."""
    dest.mkdir()
    for name in os.listdir(tiny_llm_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_llm_dir, name), dest / name)
    state = load_file(os.path.join(tiny_llm_dir, "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # a tied copy, as torch.save of state_dict() has
    kwargs = {"_use_new_zipfile_serialization": False} if legacy else {}
    if shards == 1:
        torch.save(state, dest / "pytorch_model.bin", **kwargs)
        return dest
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, dest / file, **kwargs)
        weight_map.update({n: file for n in part})
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def _same_folder(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        if name != "README.md":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("shards", [1, 3])
def test_pickle_streams_to_the_same_bytes_as_in_memory(tiny_llm_dir, tmp_path, shards):
    src = _pickle_copy(tiny_llm_dir, tmp_path / "pickled", shards=shards)
    streamed = run(compose(_overrides(src, tmp_path / "str", "model.allow_pickle=true")))  # pipeline=auto
    assert streamed["run"]["pipeline"] == "streaming" and "never loaded" in streamed["run"]["pipeline_reason"]
    run(compose(_overrides(src, tmp_path / "mem", "model.allow_pickle=true", "pipeline=in_memory")))
    _same_folder(tmp_path / "str" / "model", tmp_path / "mem" / "model")
    # and the same bytes as streaming the original safetensors checkpoint
    run(compose(_overrides(tiny_llm_dir, tmp_path / "safe", "pipeline=streaming")))
    _same_folder(tmp_path / "str" / "model", tmp_path / "safe" / "model")


@pytest.mark.parametrize("pipeline", ["streaming", "in_memory", "auto"])
def test_without_consent_every_pipeline_refuses_naming_the_option(tiny_llm_dir, tmp_path, pipeline):
    src = _pickle_copy(tiny_llm_dir, tmp_path / "pickled")
    with pytest.raises(ModelNotFoundError, match=r"has only pickle weights .*set model\.allow_pickle=true if you trust"):
        run(compose(_overrides(src, tmp_path / "out", f"pipeline={pipeline}")))
    assert not (tmp_path / "out" / "model").exists()


def test_checkpoint_files_refuses_pickle_without_unpickling_it(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened: refused by name
    with pytest.raises(StreamingError, match=r"has only pickle weights \(pytorch_model\.bin\).*model\.allow_pickle=true"):
        checkpoint_files(str(tmp_path))


def test_a_legacy_pickle_is_streamed_by_nobody_auto_loads_it_in_memory(tiny_llm_dir, tmp_path):
    src = _pickle_copy(tiny_llm_dir, tmp_path / "legacy", legacy=True)
    with pytest.raises(StreamingError, match=r"pipeline=streaming cannot run this: the pickle checkpoint "
                                             r"'pytorch_model\.bin' is in torch's legacy format .* cannot be "
                                             r"memory-mapped tensor by tensor.*Use pipeline=in_memory"):
        run(compose(_overrides(src, tmp_path / "refused", "model.allow_pickle=true", "pipeline=streaming")))
    assert not (tmp_path / "refused").exists()  # decided from the files, before any output
    report = run(compose(_overrides(src, tmp_path / "auto", "model.allow_pickle=true")))
    assert report["run"]["pipeline"] == "in_memory"
    assert report["run"]["pipeline_reason"].startswith("auto: cannot stream: the pickle checkpoint 'pytorch_model.bin' "
                                                       "is in torch's legacy format")
    _same_folder(tmp_path / "auto" / "model", _streamed_safetensors(tiny_llm_dir, tmp_path))


def _streamed_safetensors(tiny_llm_dir, tmp_path):
    run(compose(_overrides(tiny_llm_dir, tmp_path / "safe", "pipeline=streaming")))
    return tmp_path / "safe" / "model"


def test_a_pickle_that_is_not_a_state_dict_is_refused_with_weights_only(tiny_llm_dir, tmp_path):
    src = _pickle_copy(tiny_llm_dir, tmp_path / "odd")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": {"optimizer": "adam", "step": 3}},
               src / "pytorch_model.bin")
    with pytest.raises(StreamingError, match=r"pytorch_model\.bin' does not hold a state dict \(name → tensor\)"):
        run(compose(_overrides(src, tmp_path / "out", "model.allow_pickle=true", "pipeline=streaming")))
    assert not (tmp_path / "out" / "model").exists()


def test_pickle_files_are_mapped_one_at_a_time(tiny_llm_dir, tmp_path):
    src = _pickle_copy(tiny_llm_dir, tmp_path / "sharded", shards=3)
    files = checkpoint_files(str(src), allow_pickle=True)
    source = TensorSource(files)
    slots = {id(r.slot) for r in source.readers.values()}
    assert len(source.readers) == 3 and len(slots) == 1  # one shared slot: one open mapping
    slot = next(iter(source.readers.values())).slot
    for name, path in sorted(files.items()):
        tensor = source.get(name)
        assert slot.path == path and tensor.shape == source.readers[path].tensors[name].shape
    assert source.dtype("model.norm.weight") == torch.float32
