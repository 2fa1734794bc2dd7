"""The command line's front door: every mistake in a command ends as one `hfquant: error:` line and exit 2, in
seconds, before anything is written — misspelled group options and keys (with the closest match), `+` keys
outside the plugin-option namespaces, secrets, a bad value in any job of a sweep, broken plugins — and Hydra's
own files go under output_dir instead of ./outputs/."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from hfquant.config import ConfigError
from hfquant.precheck import check_jobs
from tests.conftest import fake_distribution, tiny_overrides

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hfquant")
TOKEN = "hf_" + "Qw3eR5tY7uI9oP1aS3dF5gH7jK9lZ1xC3v"  # token-shaped


def hfquant(*args, cwd=None, env=None, timeout=120):
    command = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "hfquant"]
    full_env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "HFQUANT_VERBOSE")}
    full_env.update(HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


def one_error_line(result) -> str:
    """The command failed the way a user error should: exit 2, a single `hfquant: error:` line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfquant: error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("model=smolm2", "model=smolm2: no such option in config group 'model'; available: hub, minilm, smollm2. "
                     "Did you mean 'smollm2'?"),
    ("calibration=pydc", "calibration=pydc: no such option in config group 'calibration'; available: hub, mix, "
                         "none, prose, pydoc, random, text, wikitext2. Did you mean 'pydoc'?"),
    ("evaluation=txt", "Did you mean 'text'?"),
    ("hub=defualt", "hub=defualt: no such option in config group 'hub'; available: default. Did you mean 'default'?"),
    ("hydra/launcher=jobllib", "no such option in config group 'hydra/launcher'; available: basic, joblib. "
                               "Did you mean 'joblib'?"),
    ("observer=percentil", "observer: unknown observer 'percentil'; registered: minmax, moving-average, mse, "
                           "percentile. Did you mean 'percentile'?"),
])
def test_a_misspelled_group_option_names_the_closest_match(tmp_path, override, message):
    start = time.perf_counter()
    result = hfquant(override, f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert message in one_error_line(result)
    assert time.perf_counter() - start < 20  # nothing loaded (the import of torch + transformers is most of it)
    assert os.listdir(tmp_path) == []  # no outputs/, no output_dir


@pytest.mark.parametrize("override", ["outptu_dir=out", "+outptu_dir=out", "++outptu_dir=out"])
def test_a_misspelled_key_is_refused_with_or_without_plus(tmp_path, override):
    line = one_error_line(hfquant(override, cwd=tmp_path))
    assert "unknown key 'outptu_dir'; did you mean 'output_dir'?" in line
    if override.startswith("+"):
        assert "'+' adds only plugin options" in line
    assert os.listdir(tmp_path) == []


def test_a_misspelled_nested_key_is_matched_at_its_level(tmp_path):
    line = one_error_line(hfquant("scheme.weights.grup_size=32", cwd=tmp_path))
    assert "unknown key 'scheme.weights.grup_size'; did you mean 'scheme.weights.group_size'?" in line


@pytest.mark.parametrize("override", [f"+hub.auth={TOKEN}", f"+model.api_key={TOKEN}",
                                      f"+hydra.job.env_set.HF_TOKEN={TOKEN}", f"hub.token={TOKEN}"])
def test_a_secret_under_any_key_is_refused_and_never_echoed(tmp_path, override):
    result = hfquant(override, f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    line = one_error_line(result)
    assert "never pass a token or other secret on the command line" in line and "HF_TOKEN" in line
    assert TOKEN not in result.stdout + result.stderr
    assert os.listdir(tmp_path) == []


def test_plus_still_adds_plugin_options_that_are_then_checked(tmp_path):
    line = one_error_line(hfquant("+calibration.colum=text", f"output_dir={tmp_path / 'out'}", cwd=tmp_path))
    assert "calibration: unknown option(s) ['colum']" in line and "allowed: ['column']" in line
    line = one_error_line(hfquant("+observer.options.upper_pct=99", f"output_dir={tmp_path / 'out'}", cwd=tmp_path))
    assert "observer.options: unknown option(s) ['upper_pct']" in line


def test_a_missing_required_value_is_named(tmp_path):
    line = one_error_line(hfquant("model=hub", f"output_dir={tmp_path / 'out'}", cwd=tmp_path))
    assert "model.path is not set" in line


def test_a_sweep_with_a_bad_value_in_its_second_job_fails_before_any_job_runs(tiny_llm_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_llm_dir, "x") if not o.startswith("output_dir")]
    result = hfquant("-m", "scheme=w4a16", "scheme.weights.group_size=32,0", f"hydra.sweep.dir={sweep}", *overrides,
                     cwd=tmp_path)
    line = one_error_line(result)
    assert "sweep job #1 (scheme.weights.group_size=0): scheme.weights: group_size must be > 0" in line
    assert "(no job was run)" in line
    assert not sweep.exists() and os.listdir(tmp_path) == []


def test_every_job_of_a_choice_or_range_sweep_is_composed_and_validated(tiny_llm_dir, tmp_path):
    from hfquant.config_nodes import register_config_nodes

    register_config_nodes()  # what the CLI does before checking
    base = [*tiny_overrides(tiny_llm_dir, tmp_path / "x"), f"hydra.sweep.dir={tmp_path / 's'}"]
    base = [o for o in base if not o.startswith("output_dir")]
    check_jobs([*base, "scheme=w4a16", "scheme.weights.group_size=range(16,64,16)"], multirun=True)
    with pytest.raises(ConfigError, match=r"sweep job #1 \(scheme=w8a16 observer.options.upper=101\): "
                                          r"observer.options: percentile needs 0 <= lower < upper <= 100"):
        check_jobs([*base, "scheme=w8a16,w4a16", "observer=percentile", "observer.options.upper=choice(99,101)"],
                   multirun=True)


def test_sweep_jobs_that_would_share_one_output_dir_are_refused(tmp_path):
    line = one_error_line(hfquant("-m", "scheme=w8a16,w4a16", f"output_dir={tmp_path / 'o'}", cwd=tmp_path))
    assert "sweep job #0 (scheme=w8a16) and sweep job #1 (scheme=w4a16) would both write output_dir" in line


def test_an_output_dir_inside_a_file_is_refused_before_hydra_writes(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    line = one_error_line(hfquant(f"output_dir={tmp_path / 'notes.txt' / 'run'}", cwd=tmp_path))
    assert "is a file, not a folder" in line
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize("how", [["--verbose"], []], ids=["--verbose", "HYDRA_FULL_ERROR"])
def test_verbose_shows_the_traceback(tmp_path, how):
    env = {} if how else {"HYDRA_FULL_ERROR": "1"}
    result = hfquant(*how, "scheme.weights.group_size=0", f"output_dir={tmp_path / 'o'}", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr and "ConfigError" in result.stderr


def test_hydra_files_go_under_output_dir_and_a_refused_run_keeps_them(tiny_llm_dir, tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    overrides = ["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={out}", "scheme=w8a16", "calibration=none", "algorithm=rtn",
                 "evaluation=none"]
    first = hfquant(*overrides, cwd=cwd, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.listdir(cwd) == []  # no ./outputs/<date>/<time>/
    runs = os.listdir(out / ".hydra")
    assert len(runs) == 1
    saved = out / ".hydra" / runs[0]
    assert {"config.yaml", "hydra.yaml", "overrides.yaml", "cli.log"} <= set(os.listdir(saved))
    assert yaml.safe_load((saved / "config.yaml").read_text())["output_dir"] == str(out)
    assert "pipeline streaming" in (saved / "cli.log").read_text()
    before = {name: (saved / name).read_bytes() for name in os.listdir(saved)}
    assert sorted(os.listdir(out)) == [".hfquant-resume.json", ".hydra", "model", "report.json", "report.md"]

    time.sleep(1.1)  # a later second: its own .hydra/<timestamp>/
    refused = hfquant(*overrides, cwd=cwd, timeout=300)
    assert "already holds a run" in one_error_line(refused)
    assert {name: (saved / name).read_bytes() for name in os.listdir(saved)} == before
    assert os.listdir(cwd) == [] and json.loads((out / "report.json").read_text())["run"]["scheme"] == "w8a16"


def test_an_explicit_hydra_run_dir_is_kept(tiny_llm_dir, tmp_path):
    """The placement is only a default: `hydra.run.dir=` (as the other tests use) still decides."""
    from hfquant.config_nodes import register_config_nodes

    register_config_nodes()
    assert check_jobs([f"output_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}"]) == []
    assert check_jobs([f"output_dir={tmp_path / 'o'}"])[0] == "hydra.run.dir=${output_dir}"


@pytest.mark.parametrize("command", [["plugins"], ["observer=minmax"]], ids=["hfquant plugins", "hfquant run"])
def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, command):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "hfquant-broken", "broken_plugin", "raise RuntimeError('boom at import')\n")
    result = hfquant(*command, f"output_dir={tmp_path / 'o'}" if command != ["plugins"] else "--json",
                     cwd=tmp_path, env={"PYTHONPATH": str(site)})
    line = one_error_line(result)
    assert ("plugin 'broken_plugin' (from hfquant-broken) failed to import: RuntimeError: boom at import; "
            "uninstall it (pip uninstall hfquant-broken)") in line and "HFQUANT_LOAD_PLUGINS" in line


def test_a_plugin_that_takes_a_registered_name_is_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "hfquant-copycat", "copycat_plugin", """
        from hfquant import Observer, hookimpl

        @hookimpl
        def register_observers(register):
            register("minmax", Observer)
    """)
    line = one_error_line(hfquant("plugins", cwd=tmp_path, env={"PYTHONPATH": str(site)}))
    assert ("observer 'minmax' is registered by both plugin 'hfquant.builtin.observers.minmax' and plugin "
            "'copycat_plugin'") in line


def test_an_allowlisted_plugin_that_is_not_installed_is_named_in_a_warning(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "hfquant-sigma", "sigma_plugin", """
        from hfquant import Observer, hookimpl

        @hookimpl
        def register_observers(register):
            register("sigma", Observer)
    """)
    result = hfquant("plugins", cwd=tmp_path, env={"PYTHONPATH": str(site), "HFQUANT_LOAD_PLUGINS": "hfquant-sigam"})
    assert result.returncode == 0, result.stderr
    assert ("HFQUANT_LOAD_PLUGINS names 'hfquant-sigam', but no such plugin is installed (installed plugins: "
            "sigma_plugin (from hfquant-sigma))") in result.stderr
    assert result.stderr.count("hfquant-sigam") == 1 and "sigma_plugin" not in result.stdout
    loaded = hfquant("plugins", cwd=tmp_path, env={"PYTHONPATH": str(site), "HFQUANT_LOAD_PLUGINS": "hfquant-sigma"})
    assert loaded.returncode == 0 and "sigma_plugin 0.1 [entry point]" in loaded.stdout and loaded.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["scheme", "--help"], "hfquant: error: 'scheme' needs an option: scheme=<option>, one of fp4, "),
    (["scheme"], "hfquant: error: 'scheme' needs an option: scheme=<option>, one of fp4, "),
    (["nonsense", "output_dir=x"], "hfquant: error: 'nonsense' is not an override: write key=value"),
], ids=["group-then-help", "group", "word"])
def test_a_word_without_a_value_says_what_to_write(args, message, tmp_path):
    """Not Hydra's "missing EQUAL at '<EOF>'" parse error: the group's options, or the key=value form."""
    line = one_error_line(hfquant(*args, cwd=tmp_path))
    assert line.startswith(message) and ("w4a16" in line or "lists every config group" in line)
    assert os.listdir(tmp_path) == []  # refused before Hydra wrote anything


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path):
    """Retries of a failed load would otherwise pile up `.hydra/<time>/` folders in an output_dir holding nothing."""
    missing = tmp_path / "no-such-model"
    new = tmp_path / "new"
    assert "does not exist" in one_error_line(hfquant("model=hub", f"model.path={missing}", f"output_dir={new}"))
    assert not new.exists()
    mine = tmp_path / "mine"  # a folder the user made is theirs: Hydra's record of the failed run stays in it
    mine.mkdir()
    one_error_line(hfquant("model=hub", f"model.path={missing}", f"output_dir={mine}"))
    assert os.listdir(mine) == [".hydra"]
