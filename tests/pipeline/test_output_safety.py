"""Nothing lost, nothing mislabelled: one run per output folder, resume only of the same request, nothing that
resume accepts after a failure, cleanup after kills, one line after Ctrl-C, unusable folders refused up front.

Kills and disk faults are injected at named points with HFQUANT_FAULT (hfquant/pipeline/faults.py): a full disk
and a read-only file system cannot be made here without mount privileges, so those two raise the OSError the
kernel would."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from hfquant.pipeline import safety
from hfquant.pipeline.lock import LOCK_NAME, OutputLock, OutputLockedError
from hfquant.pipeline.output import OutputExistsError, OutputFolderError, RESUME_RECORD
from hfquant.pipeline.run import ReloadCheckError, run
from tests.conftest import compose, tiny_overrides

HOLD_LOCK = """
import sys, time
from hfquant.pipeline.lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def cli(*args, fault=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("HFQUANT_FAULT", None)
    if fault:
        env["HFQUANT_FAULT"] = fault
    # A job started in the background of a non-interactive shell inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the child the default disposition a user's terminal gives it.
    return subprocess.run([sys.executable, "-m", "hfquant", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def args(model_dir, out, *extra, stream=False) -> list:
    """Overrides for the tiny model; `stream` = nothing to evaluate, so the streaming pipeline runs."""
    if stream:
        return ["model=hub", f"model.path={model_dir}", "model.name=tiny-llama", f"output_dir={out}",
                "calibration=none", "algorithm=rtn", "evaluation=none", *extra]
    return tiny_overrides(model_dir, out, *extra)


def visible(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".hydra"))


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_holder_frees_it(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"in use by another hfquant run \(pid {holder.pid} on "):
            run(compose(args(tiny_llm_dir, out, "scheme=w8a16", stream=True)))
        assert not (out / "model").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()  # the killed run's file stays; its kernel lock died with it
    run(compose(args(tiny_llm_dir, out, "scheme=w8a16", stream=True)))
    assert (out / "model" / "config.json").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("holder, refused", [
    ({"pid": 2**22 + 12345, "host": socket.gethostname()}, False),  # a dead process on this host: taken over
    ({"pid": os.getppid(), "host": socket.gethostname()}, True),     # a live one: refused
    ({"pid": 1, "host": "some-other-host"}, True),                   # another host's: cannot tell, refused
])
def test_without_kernel_locks_the_pid_and_host_decide(tmp_path, monkeypatch, holder, refused):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("hfquant.pipeline.lock.fcntl.flock", no_locks)
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(holder, started=time.time())))
    lock = OutputLock(str(tmp_path))
    if refused:
        with pytest.raises(OutputLockedError, match=f"pid {holder['pid']} on {holder['host']}"):
            lock.acquire()
    else:
        lock.acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()


def test_resume_with_a_different_request_is_refused_naming_the_differences(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    before = (out / "report.json").read_text()
    with pytest.raises(OutputExistsError, match=r"scheme.name: 'w8a16' in the folder, 'w4a16' now") as refused:
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "resume=true")))
    assert "description" not in str(refused.value)  # the presets' prose follows from their names: not listed
    with pytest.raises(OutputExistsError, match=r"observer: 'minmax' in the folder, 'mse' now"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "observer=mse", "resume=true")))
    other_model = tmp_path / "copy-of-the-model"
    shutil.copytree(tiny_llm_dir, other_model)
    with pytest.raises(OutputExistsError, match=r"model.path: .* in the folder, .*copy-of-the-model' now"):
        run(compose(tiny_overrides(str(other_model), out, "scheme=w8a16", "resume=true")))
    assert (out / "report.json").read_text() == before
    resumed = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "resume=true")))
    assert resumed["reload_check"]["ok"] and resumed["quantization"]["resumed"]


def test_resume_refuses_a_model_folder_whose_files_were_changed(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    from safetensors.torch import load_file, save_file

    weights = out / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith("weight_scale"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ReloadCheckError, match="no longer reproduces the logits recorded when it was written"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "resume=true")))


def test_a_failed_reload_check_leaves_nothing_that_resume_accepts(tiny_llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("hfquant.pipeline.run.check_reload",
                        lambda *a: {"ok": False, "max_abs_logit_difference": 3.0, "reference": None})
    with pytest.raises(ReloadCheckError, match=r"does not reproduce .* model/ was removed"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    assert visible(out) == []
    monkeypatch.undo()
    with pytest.raises(OutputExistsError, match="no finished model/ to resume from"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "resume=true")))


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streaming"])
def test_partials_of_a_killed_run_are_removed_by_the_next_run(tiny_llm_dir, tmp_path, stream):
    out = tmp_path / "run"
    killed = cli(*args(tiny_llm_dir, out, "scheme=w8a16", stream=stream), fault="save:written:SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    partials = [p.name for p in out.iterdir() if p.name.startswith(".model.partial-")]
    assert len(partials) == 1 and (out / partials[0] / "config.json").exists()
    assert not (out / "model").exists()
    done = cli(*args(tiny_llm_dir, out, "scheme=w8a16", stream=stream))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p for p in out.iterdir() if p.name.startswith((".model.", LOCK_NAME))]
    assert (out / "model" / "config.json").exists()


def test_ctrl_c_before_saving_is_one_line_and_writes_nothing(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    stopped = cli(*tiny_overrides(tiny_llm_dir, out, "scheme=w8a16"), fault="stage:quantize:SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == \
        "hfquant: error: interrupted during quantize; nothing was written to output_dir"
    assert not out.exists()  # the run created it and wrote nothing: not even Hydra's record of it is left


def test_ctrl_c_after_the_checked_save_keeps_the_model_for_resume(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    stopped = cli(*tiny_overrides(tiny_llm_dir, out, "scheme=w8a16"), fault="stage:evaluate quantized:SIGTERM")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == ("hfquant: error: interrupted during evaluate quantized; "
                                                       "model/ was saved and checked; resume=true reuses it")
    assert visible(out) == [RESUME_RECORD, "model"]
    resumed = run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "resume=true")))
    assert resumed["reload_check"]["ok"] and "perplexity" in resumed["quantized"]


def test_an_output_dir_that_is_a_file_is_refused_untouched(tiny_llm_dir, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        run(compose(tiny_overrides(tiny_llm_dir, target, "scheme=w8a16")))
    assert target.read_text() == "mine"


def test_a_read_only_output_dir_is_refused_before_loading(tiny_llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        match = "not writable"
    else:  # root writes anywhere; a read-only mount needs privileges this machine's tests do not have
        def read_only(self):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(OutputLock, "acquire", read_only)
        match = "on a read-only file system"
    monkeypatch.setattr("hfquant.pipeline.run.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(OutputFolderError, match=match):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))


def test_too_little_space_is_refused_before_loading(tiny_llm_dir, tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: free._replace(free=1000))
    monkeypatch.setattr("hfquant.pipeline.run.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(OutputFolderError, match=r"has 0.0 MiB free, and this run writes at least 0.\d MiB \(every parameter at 8 bits\)"):
        run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "out", "scheme=w8a16")))


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streaming"])
def test_a_disk_filling_up_while_saving_is_named_and_cleaned_up(tiny_llm_dir, tmp_path, monkeypatch, stream):
    out = tmp_path / "run"
    monkeypatch.setenv("HFQUANT_FAULT", "save:written:ENOSPC")
    with pytest.raises(OutputFolderError, match=r"no space left on the device of output_dir .* during (save|stream quantize)"):
        run(compose(args(tiny_llm_dir, out, "scheme=w8a16", stream=stream)))
    assert visible(out) == []


def test_resume_compares_the_algorithms_and_what_they_learned_from(tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    common = ["algorithm=gptq", "scheme.weights.group_size=32", "calibration.generated=0"]
    run(compose(tiny_overrides(tiny_llm_dir, out, *common, "algorithm.gptq.dampening=0.05")))
    with pytest.raises(OutputExistsError, match=r"codes_from.algorithms: .*'dampening': 0.05.* in the folder, "
                                                r"\[\['gptq', \{\}\]\] now"):
        run(compose(tiny_overrides(tiny_llm_dir, out, *common, "resume=true")))
    with pytest.raises(OutputExistsError, match=r"codes_from.calibration.num_samples: 4 in the folder, 3 now"):
        run(compose(tiny_overrides(tiny_llm_dir, out, *common, "algorithm.gptq.dampening=0.05", "resume=true",
                                   "calibration.num_samples=3")))
    resumed = run(compose(tiny_overrides(tiny_llm_dir, out, *common, "algorithm.gptq.dampening=0.05", "resume=true")))
    assert resumed["quantization"]["algorithms"] == ["gptq"] and resumed["run"]["algorithm_options"] == {"gptq": {"dampening": 0.05}}
    assert "`gptq` (dampening=0.05)" in (out / "model" / "README.md").read_text()


def test_a_folder_recorded_before_algorithms_were_still_resumes(tiny_llm_dir, tmp_path):
    from hfquant.pipeline.output import RESUME_RECORD

    out = tmp_path / "run"
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16")))
    record_path = out / RESUME_RECORD
    record = json.loads(record_path.read_text())
    del record["request"]["codes_from"]
    record_path.write_text(json.dumps(record))
    assert run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "resume=true")))["quantization"]["resumed"]
