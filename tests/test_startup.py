"""`import hfquant` stays light (transformers loads only when used) yet still registers hfquant's format with
transformers whenever transformers is imported, before or after hfquant; `hfquant --help` lists every group."""

import subprocess
import sys

import pytest

REGISTERED = """
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from hfquant.formats.config_guard import GUARD_MODEL_TYPE
assert "hfquant" in AUTO_QUANTIZER_MAPPING and "hfquant" in AUTO_QUANTIZATION_CONFIG_MAPPING
assert GUARD_MODEL_TYPE in CONFIG_MAPPING
print("registered")
"""


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_hfquant_does_not_import_transformers():
    out = python("import sys, hfquant\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    assert out.strip() == "[]"


@pytest.mark.parametrize("order", [
    "import hfquant\nfrom transformers import AutoModelForCausalLM",
    "import transformers\nimport hfquant\nfrom transformers import AutoModelForCausalLM",
    "from transformers import AutoModelForCausalLM\nimport hfquant",
    "import hfquant\nfrom transformers import AutoConfig",  # the config guard alone, quantizers not yet loaded
    "import hfquant\nimport hfquant.pipeline.run",  # hfquant's own modules importing transformers mid-import
    # a probe (IDEs, plugin scanners) that finds the module's spec without running it must not use the hook up
    "import hfquant, importlib.util\nimportlib.util.find_spec('transformers.models.auto.configuration_auto')\n"
    "importlib.util.find_spec('transformers.quantizers.auto')\nfrom transformers import AutoModelForCausalLM",
])
def test_format_is_registered_whatever_the_import_order(order):
    assert python(order + "\n" + REGISTERED).strip().endswith("registered")


def test_reload_after_plain_import_order(tiny_llm_dir, tmp_path):
    """What users write: `import hfquant` first, `from_pretrained` of a saved folder later."""
    code = f"""
import hfquant, torch
from hfquant.pipeline.run import run
from tests.conftest import compose
run(compose(["model=hub", "model.path={tiny_llm_dir}", "output_dir={tmp_path / 'run'}", "calibration=none",
             "algorithm=rtn", "evaluation=none", "scheme=w8a16", "backend=fake"]))
"""
    python(code)
    out = python(f"""
import hfquant
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'run' / 'model')!r})
print(type(model.model.layers[0].mlp.up_proj).__name__)
""")
    assert out.strip() == "QuantLinear"


def test_help_lists_groups_and_the_composed_config():
    done = subprocess.run([sys.executable, "-m", "hfquant", "--help", "scheme=w8a8"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: hfquant" in done.stdout
    assert "\nscheme: " in done.stdout and "w4a16-asym" in done.stdout  # a group and its options
    assert "format: auto*, bitsandbytes, compressed-tensors, gguf, hfquant" in done.stdout  # * = the choice
    assert "w8a8*," in done.stdout and "w4a16*" not in done.stdout and "calibration: hub, mix*," in done.stdout
    config = done.stdout.split("== Config (override anything: key=value) ==", 1)[1]
    assert "name: w8a8" in config and "\nhydra:" not in config  # Hydra's own settings: --hydra-help


def test_help_with_a_bad_override_is_one_error_line():
    done = subprocess.run([sys.executable, "-m", "hfquant", "--help", "scheme=nope"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("hfquant: error: scheme: unknown scheme 'nope'")


def test_a_failing_registration_warns_and_the_library_still_imports():
    out = python("""
import sys, warnings
from hfquant.import_hooks import after_import
def broken():
    raise RuntimeError("boom")
after_import("json.tool", broken)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import json.tool
print(json.tool.__name__, [str(w.message) for w in caught])
""")
    assert out.startswith("json.tool") and "could not register with json.tool (RuntimeError: boom)" in out


@pytest.mark.parametrize("argv", [["--config-name", "config", "--help"], ["-m", "scheme=w4a16,w8a16", "--help"], ["-h"]],
                         ids=["flag-with-a-value", "sweep", "short"])
def test_help_reads_the_command_line_as_a_run_does(argv):
    done = subprocess.run([sys.executable, "-m", "hfquant", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "== Config groups (group=option; * = this command line's choice" in done.stdout


def test_help_takes_overrides_on_both_sides_of_the_flag():
    done = subprocess.run([sys.executable, "-m", "hfquant", "scheme=w8a16", "--help", "output_dir=after_the_flag"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # was argparse's "unrecognized arguments: output_dir=after_the_flag"
    config = done.stdout.split("== Config (override anything: key=value) ==", 1)[1]
    assert "name: w8a16" in config and "output_dir: after_the_flag" in config


def test_a_finished_run_exits_without_teardown_but_runs_exit_handlers(monkeypatch):
    """`hfquant` skips the interpreter's ~2 s teardown of torch after a run, not the exit handlers (logging's
    flush, a plugin's cleanup); with a thread still working it exits normally, which waits for that thread."""
    import atexit
    import threading

    from hfquant import cli

    calls = []
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("handlers"))
    monkeypatch.setattr(cli, "exit_now", lambda code: calls.append(("exit_now", code)))
    with monkeypatch.context() as alone:  # whatever threads other tests left behind
        alone.setattr(threading, "enumerate", lambda: [threading.main_thread()])
        cli.finish(2)
    assert calls == ["handlers", ("exit_now", 2)]

    calls.clear()
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=False)
    worker.start()
    try:
        with pytest.raises(SystemExit) as exited:
            cli.finish(0)
        assert exited.value.code == 0 and calls == []
    finally:
        release.set()
        worker.join()
