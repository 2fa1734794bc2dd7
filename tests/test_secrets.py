"""Secrets are never written: a Hub token typed into any config value, or a value under a secret-looking key,
appears in no file of the run (report.json, report.md, the model card, Hydra's .hydra files, a sweep's
multirun.yaml and failed.json); the card's reproduce command lists only keys hfquant knows."""

import json
import os
import shutil
import subprocess
import sys

import yaml

from hfquant.pipeline import card
from hfquant.pipeline.run import run
from hfquant.redact import REDACTED, redact, redact_text, redact_yaml_file
from tests.conftest import compose

TOKEN = "hf_" + "Ab3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3f"  # the shape of a real Hub token: hf_ + 34 letters/digits
OTHER = "hf_" + "Zz9yX8wV7uT6sR5qP4oN3mL2kJ1iH0gF9e"
QUIET = ["calibration=none", "algorithm=rtn", "evaluation=none", "scheme=w8a16", "backend=cpu"]


def files_under(*folders):
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    yield os.path.join(root, name), f.read()


def assert_no_secret(*folders, secrets=(TOKEN, OTHER)):
    found = [(path, s) for path, data in files_under(*folders) for s in secrets if s.encode() in data]
    assert not found, found


def test_a_token_in_a_config_value_is_in_no_file_of_the_run(tiny_llm_dir, tmp_path):
    out, hydra_dir = tmp_path / "out", tmp_path / "hydra"
    cmd = [sys.executable, "-m", "hfquant", "model=hub", f"model.path={tiny_llm_dir}", f"model.name={TOKEN}",
           f"model.base_model=org/{OTHER}", f"hub.commit_message=upload {TOKEN}", f"output_dir={out}",
           f"hydra.run.dir={hydra_dir}", *QUIET]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_secret(out, hydra_dir)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"]["name"] == REDACTED and report["run"]["model"] == REDACTED
    assert report["config"]["model"]["base_model"] == f"org/{REDACTED}"
    assert report["config"]["hub"]["commit_message"] == f"upload {REDACTED}"
    overrides = yaml.safe_load((hydra_dir / ".hydra" / "overrides.yaml").read_text())
    assert f"model.name={REDACTED}" in overrides and f"model.path={tiny_llm_dir}" in overrides
    saved = yaml.safe_load((hydra_dir / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["name"] == REDACTED and saved["scheme"]["name"] == "w8a16"
    readme = (out / "model" / "README.md").read_text()
    reproduce = readme.split("## Reproduce", 1)[1]
    assert f"model.name={REDACTED}" in reproduce and "hub." not in reproduce and "output_dir" not in reproduce


def test_a_sweep_writes_no_token_in_multirun_yaml_or_failed_json(tiny_llm_dir, tmp_path):
    broken = tmp_path / "broken"  # the job fails at run time: its failed.json holds its overrides
    shutil.copytree(tiny_llm_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:100])
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hfquant", "-m", "model=hub", f"model.path={broken}", f"model.name={TOKEN},{OTHER}",
           f"hydra.sweep.dir={sweep}", *QUIET]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert_no_secret(sweep)
    failed = json.loads((sweep / "run-1" / "failed.json").read_text())
    assert f"model.name={REDACTED}" in failed["overrides"]
    assert REDACTED in (sweep / "multirun.yaml").read_text()
    assert TOKEN not in result.stderr and OTHER not in result.stderr


def test_report_config_redacts_secret_keys_and_tokens(tiny_llm_dir, tmp_path):
    """In process (the CLI refuses such keys earlier): whatever reaches the writers is redacted."""
    cfg = compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'out'}", *QUIET,
                   f"model.name={TOKEN}", "+model.auth_header=Bearer-sekrit-value"])
    report = run(cfg)
    assert report["config"]["model"]["auth_header"] == REDACTED and report["config"]["model"]["name"] == REDACTED
    assert_no_secret(tmp_path / "out", secrets=(TOKEN, "sekrit"))


def test_redaction_rules():
    assert redact_text(f"push with {TOKEN}.") == f"push with {REDACTED}."
    assert redact_text("hf_device_map and hf_short123") == "hf_device_map and hf_short123"  # not token-shaped
    assert redact_text("+hub.auth=hunter2,scheme=w8a16") == f"+hub.auth={REDACTED},scheme=w8a16"
    assert redact_text("model.path=/models/author-x") == "model.path=/models/author-x"
    tree = {"hub": {"password": "x", "api_key": 3, "secret": {"token": "y"}}, "evaluation": {"seq_len": 64},
            "model": {"name": TOKEN, "files": [TOKEN, "a.txt"]}, "access_token": None}
    assert redact(tree) == {"hub": {"password": REDACTED, "api_key": REDACTED, "secret": {"token": REDACTED}},
                            "evaluation": {"seq_len": 64}, "model": {"name": REDACTED, "files": [REDACTED, "a.txt"]},
                            "access_token": None}


def test_saved_hydra_yaml_is_rewritten_only_when_it_holds_a_secret(tmp_path):
    clean = tmp_path / "clean.yaml"
    clean.write_text("- scheme=w8a16\n- model.path=/models/x\n")
    before = clean.stat().st_mtime_ns
    assert not redact_yaml_file(str(clean)) and clean.stat().st_mtime_ns == before
    dirty = tmp_path / "overrides.yaml"
    dirty.write_text(f"- scheme=w8a16\n- +hub.password=hunter2\n- model.name={TOKEN}\n")
    assert redact_yaml_file(str(dirty))
    assert yaml.safe_load(dirty.read_text()) == ["scheme=w8a16", f"+hub.password={REDACTED}", f"model.name={REDACTED}"]


def test_reproduce_command_lists_only_known_keys(monkeypatch):
    config = {"model": {"path": "/m", "name": TOKEN}, "scheme": {"name": "w8a16"}, "observer": {"options": {"grid": 100}},
              "evaluation": {"seq_len": 64, "evaluation_files": ["b.txt"]}, "output_dir": "o", "hub": {"repo_id": "a/b"},
              "stray": 1}
    argv = ["hfquant", "model=hub", "model.path=/m", f"model.name={TOKEN}", "scheme=w8a16", "+stray=1",
            "+hub.auth=hf_nope", "+observer.options.grid=100", "+evaluation.evaluation_files=[b.txt]", "output_dir=o",
            "hub.repo_id=a/b", "hydra.run.dir=x", "hydra/launcher=joblib", "model.unknown=3", "~model.name", "-m"]
    monkeypatch.setattr(sys, "argv", argv)
    assert card.reproduce_command(config) == (f"hfquant model=hub model.path=/m model.name={REDACTED} scheme=w8a16 "
                                              "+observer.options.grid=100 +evaluation.evaluation_files=[b.txt]")
