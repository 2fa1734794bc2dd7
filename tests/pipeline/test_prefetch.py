"""Read-ahead hints for a local checkpoint (hfquant/pipeline/prefetch.py): which files, in what order, how much,
started from the composed config, stopped when the pipeline reads tensors itself."""

import os

import pytest
from omegaconf import OmegaConf

from hfquant.pipeline import prefetch
from hfquant.pipeline.run import run
from tests.conftest import compose

needs_fadvise = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")


@pytest.fixture(autouse=True)
def no_prefetch_left(monkeypatch):
    monkeypatch.delenv("HFQUANT_PREFETCH", raising=False)
    prefetch.stop_prefetch()
    yield
    prefetch.stop_prefetch()


def _folder(tmp_path, names, size=3 * prefetch.HINT_BYTES // 2):
    tmp_path.mkdir(exist_ok=True)
    for name in names:
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    return tmp_path


def test_safetensors_shards_in_order_else_pickles(tmp_path):
    st = _folder(tmp_path / "st", ["model-00002-of-00002.safetensors", "config.json", "model-00001-of-00002.safetensors",
                                   "pytorch_model.bin"], size=8)
    assert [os.path.basename(p) for p in prefetch.weight_files(str(st))] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    pickles = _folder(tmp_path / "bin", ["pytorch_model.bin", "tokenizer.json"], size=8)
    assert [os.path.basename(p) for p in prefetch.weight_files(str(pickles))] == ["pytorch_model.bin"]
    assert prefetch.weight_files(str(tmp_path / "missing")) == []


@needs_fadvise
def test_hints_every_byte_then_stops_at_the_budget(tmp_path):
    folder = _folder(tmp_path, ["a.safetensors", "b.safetensors"])
    size = os.path.getsize(folder / "a.safetensors")
    whole = prefetch.Prefetch(str(folder), prefetch.weight_files(str(folder)), budget=10 * size).start()
    whole.thread.join(10)
    assert not whole.thread.is_alive() and whole.hinted == 2 * size
    part = prefetch.Prefetch(str(folder), prefetch.weight_files(str(folder)), budget=1).start()
    part.thread.join(10)
    assert part.hinted == prefetch.HINT_BYTES  # one hint, then the budget is spent


@needs_fadvise
def test_one_prefetch_per_folder_and_the_switch(tmp_path, monkeypatch):
    folder = _folder(tmp_path, ["model.safetensors"])
    first = prefetch.start_prefetch(str(folder))
    assert first is not None and first.thread.daemon  # never keeps a finished run alive
    assert prefetch.start_prefetch(str(folder) + "/") is first  # the same folder: it goes on
    prefetch.stop_prefetch()
    assert first._stop.is_set() and prefetch._active is None
    monkeypatch.setenv("HFQUANT_PREFETCH", "0")
    assert prefetch.start_prefetch(str(folder)) is None
    monkeypatch.delenv("HFQUANT_PREFETCH")
    monkeypatch.setattr(prefetch, "hint_budget", lambda: 0)  # no free memory, or nothing known of it: no hints
    assert prefetch.start_prefetch(str(folder)) is None
    assert prefetch.start_prefetch(str(tmp_path / "empty")) is None


@needs_fadvise
def test_started_from_the_config_for_local_folders_only(tmp_path):
    folder = _folder(tmp_path, ["model.safetensors"])

    def started(**model):
        prefetch.stop_prefetch()
        prefetch.prefetch_model(OmegaConf.create(model))
        return prefetch._active

    assert started(path=str(folder)).folder == os.path.realpath(folder)
    assert started(path=str(folder), gguf_file="model.gguf") is None  # a GGUF file is read by its own loader
    assert started(path="org/name") is None  # a Hub id
    assert started(path="pkg://no_such_package_here/model") is None  # refused later, by the pipeline, with its message
    assert started(path=str(tmp_path / "missing")) is None


@needs_fadvise
def test_a_run_stops_it_before_reading(tiny_llm_dir, tmp_path, monkeypatch):
    """Streaming drops the pages it has read (SafetensorsReader); a hint still going would read them again."""
    from hfquant.pipeline.streaming import TensorSource

    events = []
    stop, get = prefetch.Prefetch.stop, TensorSource.get
    monkeypatch.setattr(prefetch.Prefetch, "stop", lambda self: (events.append(("stop", self.folder)), stop(self)))
    monkeypatch.setattr(TensorSource, "get", lambda self, name: (events.append(("read", name)), get(self, name))[1])
    report = run(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'out'}", "scheme=w8a16",
                          "calibration=none", "algorithm=rtn", "evaluation=none"]))
    assert report["run"]["pipeline"] == "streaming"
    assert events[0] == ("stop", os.path.realpath(tiny_llm_dir)) and any(e[0] == "read" for e in events)
    assert prefetch._active is None


def test_the_budget_is_free_memory_never_reclaimed_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemFree: 2000000 kB\nMemAvailable: 20000000 kB\n")
    assert prefetch.hint_budget(str(meminfo)) == 1000000 * 1024  # half the free memory, below a quarter of available
    meminfo.write_text("MemTotal: 24000000 kB\nMemFree: 20000000 kB\nMemAvailable: 20000000 kB\n")
    assert prefetch.hint_budget(str(meminfo)) == 5000000 * 1024
    meminfo.write_text("MemTotal: 24000000 kB\n")
    assert prefetch.hint_budget(str(meminfo)) == 0
    assert prefetch.hint_budget(str(tmp_path / "missing")) == 0
