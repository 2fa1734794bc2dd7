"""Streaming quantization: the same folder, byte for byte, as the in-memory path; chosen automatically when
it applies; clear errors (before any output) when it cannot; nothing half-written left behind."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfquant.pipeline import streaming
from hfquant.pipeline.run import run
from hfquant.pipeline.streaming import StreamingError
from tests.conftest import compose

QUIET = ["calibration=none", "algorithm=rtn", "evaluation=none"]


def _overrides(model_dir, out, *extra):
    return ["model=hub", f"model.path={model_dir}", f"output_dir={out}", *QUIET, *extra]


def assert_same_folder(a, b):
    """Every file byte-identical except the model card (it names the pipeline and the command), and every file
    with the permissions a plain `open` gives (safetensors' own writer made the in-memory weights private)."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        for folder in (a, b):
            assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, (folder, name)
        if name != "README.md":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("scheme,backend", [("w4a16", "cpu"), ("w8a16", "cpu"), ("w8a8", "cpu"), ("w4a16", "fake"),
                                            ("int8-tensor", "fake"), ("w4a16-asym", "auto")])
@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_streaming_equals_in_memory_byte_for_byte(tiny_llm_dir, tmp_path, scheme, backend, shard):
    extra = [f"scheme={scheme}", f"backend={backend}", f"max_shard_size={shard}", "scheme.weights.group_size=32"] \
        if scheme.startswith("w4") else [f"scheme={scheme}", f"backend={backend}", f"max_shard_size={shard}"]
    mem = run(compose(_overrides(tiny_llm_dir, tmp_path / "mem", "pipeline=in_memory", *extra)))
    streamed = run(compose(_overrides(tiny_llm_dir, tmp_path / "str", "pipeline=streaming", *extra)))
    assert mem["run"]["pipeline"] == "in_memory" and streamed["run"]["pipeline"] == "streaming"
    assert_same_folder(tmp_path / "mem" / "model", tmp_path / "str" / "model")
    if shard == "20KB":
        assert (tmp_path / "str" / "model" / "model.safetensors.index.json").exists()
    # the weight error is computed by the same function on both paths
    assert streamed["quantization"]["weight_sqnr_db"] == pytest.approx(mem["quantization"]["weight_sqnr_db"], rel=1e-9)


def test_auto_streams_only_when_nothing_needs_the_model(tiny_llm_dir, tmp_path):
    r = run(compose(_overrides(tiny_llm_dir, tmp_path / "a", "scheme=w8a16")))
    assert r["run"]["pipeline"] == "streaming" and "never loaded" in r["run"]["pipeline_reason"]
    r = run(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'b'}", "scheme=w8a16",
                     "calibration=none", "algorithm=rtn", "evaluation.seq_len=64", "evaluation.max_windows=2"]))
    assert r["run"]["pipeline"] == "in_memory" and "evaluation" in r["run"]["pipeline_reason"]


@pytest.mark.parametrize("extra,message", [
    (["scheme=w8a16", "model.device_map=auto"], "device_map places a loaded model"),
    (["scheme=nf4"], "does not write tensor by tensor"),
    (["scheme=w8a16", "evaluation=pydoc"], "evaluation needs the model"),
])
def test_impossible_streaming_requests_fail_before_any_output(tiny_llm_dir, tmp_path, extra, message):
    overrides = ["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'x'}", "pipeline=streaming",
                 "calibration=none", "algorithm=rtn", "evaluation=none", *extra]
    with pytest.raises(StreamingError, match=message):
        run(compose(overrides))
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_without_tokenizer_quantizes_when_nothing_is_tokenized(tiny_llm_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(tiny_llm_dir):
        if not name.startswith("tokenizer") and name != "special_tokens_map.json":
            (bare / name).write_bytes((open(os.path.join(tiny_llm_dir, name), "rb")).read())
    for pipeline in ("streaming", "in_memory"):
        out = tmp_path / pipeline
        run(compose(_overrides(bare, out, "scheme=w8a16", f"pipeline={pipeline}")))
        assert not [f for f in os.listdir(out / "model") if f.startswith("tokenizer")]
    assert_same_folder(tmp_path / "streaming" / "model", tmp_path / "in_memory" / "model")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        run(compose(["model=hub", f"model.path={bare}", f"output_dir={tmp_path / 'e'}", "calibration=none", "algorithm=rtn",
                     "evaluation.seq_len=64"]))


def test_missing_tensor_is_refused_naming_it(tiny_llm_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_llm_dir):
        if not name.endswith(".safetensors"):
            (broken / name).write_bytes(open(os.path.join(tiny_llm_dir, name), "rb").read())
    state = load_file(os.path.join(tiny_llm_dir, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamingError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*pipeline=in_memory"):
        run(compose(_overrides(broken, tmp_path / "out", "scheme=w8a16", "pipeline=streaming")))
    assert not os.path.exists(tmp_path / "out" / "model")
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".model")]


def test_a_failure_mid_stream_leaves_no_folder_that_looks_complete(tiny_llm_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = streaming.ModuleQuantizer.__call__

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(streaming.ModuleQuantizer, "__call__", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(compose(_overrides(tiny_llm_dir, tmp_path / "out", "scheme=w8a16", "max_shard_size=20KB")))
    assert sorted(os.listdir(tmp_path / "out")) == []


def test_reader_reads_one_tensor_at_a_time(tiny_llm_dir, tmp_path, monkeypatch):
    """Memory is bounded by three checkpoint tensors: one still being written (a tensor passed through), one being
    quantized, and the one being read ahead — so at most two are alive when a read starts; every other tensor read
    is dropped before the next one is read."""
    import weakref

    alive = []
    original = streaming.TensorSource.get

    def tracking(self, name):
        tensor = original(self, name)
        alive[:] = [r for r in alive if r() is not None]
        assert len(alive) <= 2, f"{len(alive)} checkpoint tensors still alive when reading {name}"
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(streaming.TensorSource, "get", tracking)
    run(compose(_overrides(tiny_llm_dir, tmp_path / "out", "scheme=w8a16", "pipeline=streaming")))
    assert torch.is_tensor(load_file(str(tmp_path / "out" / "model" / "model.safetensors"))["model.norm.weight"])


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_a_compressed_module_keeps_nothing_of_its_weight_in_memory(tiny_llm_dir, tmp_path, monkeypatch, scheme):
    """Once a module's tensors are laid out for the writer, its plan holds neither codes nor weight scales: memory
    stays flat over a stream instead of growing with the model (per-group scales and zero points kept for every
    module once raised a 28 GiB w4a16 run's peak RSS by ~0.9 GiB). Static input scales stay: they are per tensor."""
    plans = []
    original = streaming.ModuleQuantizer.__call__

    def recording(self, mp, *args, **kwargs):
        out = original(self, mp, *args, **kwargs)
        plans.append(mp)
        return out

    monkeypatch.setattr(streaming.ModuleQuantizer, "__call__", recording)
    run(compose(_overrides(tiny_llm_dir, tmp_path / "out", f"scheme={scheme}", "pipeline=streaming",
                           "scheme.weights.group_size=32" if scheme == "w4a16" else "max_shard_size=5GB")))
    assert plans and all(mp.weight_codes is None and mp.weight_qparams is None for mp in plans)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_default_model_streams_to_the_same_bytes(tmp_path, scheme):
    """The embedded SmolLM2 (the GGUF's safetensors cache): both paths, same folder."""
    common = [f"scheme={scheme}", *QUIET]
    run(compose([f"output_dir={tmp_path / 'mem'}", "pipeline=in_memory", *common]))
    report = run(compose([f"output_dir={tmp_path / 'str'}", "pipeline=streaming", *common]))
    assert report["quantization"]["modules"] == 210
    assert_same_folder(tmp_path / "mem" / "model", tmp_path / "str" / "model")


def test_device_map_auto_runs_and_disk_offload_is_refused_with_a_way_out(tiny_llm_dir, tmp_path):
    common = ["model=hub", f"model.path={tiny_llm_dir}", "calibration=none", "algorithm=rtn", "evaluation.seq_len=64",
              "evaluation.max_windows=2", "scheme=w8a16", "backend=fake"]
    plain = run(compose([*common, f"output_dir={tmp_path / 'plain'}"]))
    mapped = run(compose([*common, f"output_dir={tmp_path / 'mapped'}", "model.device_map=auto",
                          "model.max_memory={cpu:1GB}"]))
    assert mapped["quantized"]["perplexity"] == plain["quantized"]["perplexity"]
    with pytest.raises(ValueError, match="whole model offloaded to disk.*pipeline=streaming"):
        run(compose([*common, f"output_dir={tmp_path / 'disk'}", "model.device_map=auto", "model.max_memory={cpu:100KB}"]))
    assert not (tmp_path / "disk" / "model").exists()


def test_max_memory_needs_a_device_map(tiny_llm_dir, tmp_path):
    from hfquant.config import ConfigError, validate

    with pytest.raises(ConfigError, match="model.device_map"):
        validate(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path}", "model.max_memory={cpu:1GB}"]))


def test_float_zero_points_stream_byte_for_byte_and_reload(tiny_llm_dir, tmp_path):
    """HQQ-style float zero points (float16 in the folder) on the cpu kernels: both pipelines write the same bytes,
    and the folder reloads onto the kernels with the logits the run checked."""
    base = ["model=hub", f"model.path={tiny_llm_dir}", "calibration=none", "algorithm=hqq", "scheme=w4a16-asym",
            "scheme.weights.group_size=32", "scheme.weights.float_zero_point=true", "backend=cpu"]
    mem = run(compose([*base, f"output_dir={tmp_path / 'mem'}", "pipeline=in_memory", "evaluation.seq_len=64",
                       "evaluation.max_windows=2", "++evaluation.out_of_domain=none"]))
    streamed = run(compose([*base, f"output_dir={tmp_path / 'str'}", "pipeline=streaming", "evaluation=none"]))
    assert_same_folder(tmp_path / "mem" / "model", tmp_path / "str" / "model")
    assert mem["reload_check"]["max_abs_logit_difference"] == 0.0 and streamed["run"]["pipeline"] == "streaming"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mem" / "model" / "model.safetensors"), "pt") as f:
        zero = f.get_tensor("model.layers.0.mlp.up_proj.weight_zero_point")
    assert zero.dtype == torch.float16 and not torch.equal(zero, zero.round())


class _Source:
    """A TensorSource stand-in recording which thread read what."""

    def __init__(self, tensors):
        import threading

        self.tensors, self.reads, self.main = tensors, [], threading.get_ident()

    def get(self, name):
        import threading

        self.reads.append((name, threading.get_ident() != self.main))
        value = self.tensors[name]
        if isinstance(value, Exception):
            raise value
        return value

    def tensor_bytes(self, name):
        value = self.tensors[name]
        return 0 if isinstance(value, Exception) else value.numel() * value.element_size()


def test_read_ahead_reads_the_next_tensor_on_a_thread_in_order():
    source = _Source({k: torch.full((2,), i) for i, k in enumerate("abcd")})
    reads = streaming.ReadAhead(source, list("abcd"))
    try:
        assert [int(reads.get(k)[0]) for k in "abcd"] == [0, 1, 2, 3]
    finally:
        reads.close()
    assert [name for name, _ in source.reads] == list("abcd") and all(on_thread for _, on_thread in source.reads)


def test_read_ahead_serves_a_name_out_of_order_and_resynchronises():
    source = _Source({k: torch.full((1,), i) for i, k in enumerate("abcde")})
    reads = streaming.ReadAhead(source, list("abcde"))
    try:
        assert int(reads.get("c")[0]) == 2  # not the one read ahead: read directly, then d is read ahead
        assert int(reads.get("d")[0]) == 3 and int(reads.get("e")[0]) == 4
    finally:
        reads.close()
    assert [n for n, _ in source.reads].count("d") == 1


def test_read_ahead_raises_a_read_error_when_that_tensor_is_asked_for():
    source = _Source({"a": torch.zeros(1), "b": ValueError("b is broken"), "c": torch.zeros(1)})
    reads = streaming.ReadAhead(source, ["a", "b", "c"])
    try:
        reads.get("a")
        with pytest.raises(ValueError, match="b is broken"):
            reads.get("b")
    finally:
        reads.close()


def test_write_behind_reports_a_failed_write_at_the_next_wait_and_drains_quietly():
    class Writer:
        def __init__(self):
            self.written = []

        def write(self, name, tensor):
            if name == "bad":
                raise OSError("no space left")
            self.written.append(name)

    writer, writes = Writer(), streaming.WriteBehind()
    try:
        writes.write(writer, "a", torch.zeros(1))
        writes.write(writer, "bad", torch.zeros(1))
        with pytest.raises(OSError, match="no space left"):
            writes.write(writer, "c", torch.zeros(1))  # waits for "bad" first
        writes.write(writer, "bad", torch.zeros(1))
        writes.drain()  # another error is already being reported: this one is not raised over it
        writes.write(writer, "d", torch.zeros(1))
        writes.wait()
    finally:
        writes.close()
    assert writer.written == ["a", "d"]


def test_read_ahead_leaves_large_tensors_to_be_read_when_asked(monkeypatch):
    """An embedding-sized tensor is not read ahead (two of them in flight at once raised peak RSS to 2 GiB)."""
    source = _Source({"a": torch.zeros(2), "big": torch.zeros(64), "c": torch.zeros(2)})
    monkeypatch.setattr(streaming.ReadAhead, "max_bytes", 16)
    reads = streaming.ReadAhead(source, ["a", "big", "c"])
    try:
        assert [reads.get(k).numel() for k in ("a", "big", "c")] == [2, 64, 2]
    finally:
        reads.close()
    assert source.reads == [("a", True), ("big", False), ("c", True)]
