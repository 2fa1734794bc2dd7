"""A sweep whose job fails at run time goes on: the failed job leaves failed.json (its overrides and the one
error line), the others are summarised, summary.md lists the failure, and the command exits 2 at the end."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import tiny_overrides


def _broken_copy(tiny_llm_dir, dest):
    """The tiny model with its weights file cut short: its config composes and validates; loading it fails."""
    shutil.copytree(tiny_llm_dir, dest)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dest


def _sweep(tmp_path, paths, *extra):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides("x", "x") if not o.startswith(("output_dir", "model.path"))]
    cmd = [sys.executable, "-m", "hfquant", "-m", f"model.path={','.join(str(p) for p in paths)}", "scheme=w8a16",
           f"hydra.sweep.dir={sweep}", *overrides, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return sweep, subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_a_failed_job_is_listed_and_the_others_are_summarised(tiny_llm_dir, tmp_path, launcher):
    broken = _broken_copy(tiny_llm_dir, tmp_path / "broken")
    sweep, result = _sweep(tmp_path, [broken, tiny_llm_dir], *launcher)  # job 0 fails, job 1 must still run
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    failed = json.loads((sweep / "run-0" / "failed.json").read_text())
    assert failed["job"] == 0 and f"model.path={broken}" in failed["overrides"] and "scheme=w8a16" in failed["overrides"]
    assert failed["error"] and "\n" not in failed["error"] and failed["traceback"].startswith("Traceback")
    assert not (sweep / "run-0" / "report.json").exists() and not (sweep / "run-1" / "failed.json").exists()

    rows = list(csv.DictReader(open(sweep / "summary.csv")))  # the finished job is summarised
    assert [r["output_dir"] for r in rows] == ["run-1"] and rows[0]["perplexity"]
    md = (sweep / "summary.md").read_text()
    assert md.startswith("# Sweep summary (1 runs, 1 failed)")
    assert "## Failed jobs (1)" in md and f"| run-0 | model.path={broken} scheme=w8a16 " in md
    assert failed["error"].replace("|", "\\|") in md
    assert "sweep summary:" in result.stdout

    lines = [line for line in result.stderr.splitlines() if line.startswith("hfquant: error:")]
    assert lines[0].startswith(f"hfquant: error: sweep job #0 (model.path={broken} ") and failed["error"] in lines[0]
    assert lines[-1] == (f"hfquant: error: 1 of 2 sweep job(s) failed (run-0), listed above and in {sweep / 'summary.md'}; "
                         "the others were summarised")
    assert f"sweep: run-0 failed (model.path={broken}" in result.stderr


def test_a_sweep_where_every_job_fails_still_lists_them(tiny_llm_dir, tmp_path):
    a = _broken_copy(tiny_llm_dir, tmp_path / "a")
    b = _broken_copy(tiny_llm_dir, tmp_path / "b")
    sweep, result = _sweep(tmp_path, [a, b])
    assert result.returncode == 2, result.stderr[-3000:]
    assert not (sweep / "summary.csv").exists()
    md = (sweep / "summary.md").read_text()
    assert md.startswith("# Sweep summary (0 runs finished)") and "## Failed jobs (2)" in md
    assert "| run-0 |" in md and "| run-1 |" in md
    assert result.stderr.splitlines()[-1].startswith("hfquant: error: 2 of 2 sweep job(s) failed (run-0, run-1)")


def test_rerunning_a_sweep_into_the_same_folder_forgets_old_failures(tiny_llm_dir, tmp_path):
    """A job that succeeds now drops the failed.json an earlier run of the same sweep folder left."""
    sweep = tmp_path / "sweep"
    stale = sweep / "run-0"
    stale.mkdir(parents=True)
    (stale / "failed.json").write_text(json.dumps({"job": 0, "overrides": [], "error": "old"}))
    sweep, result = _sweep(tmp_path, [tiny_llm_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (stale / "failed.json").exists() and "Failed jobs" not in (sweep / "summary.md").read_text()
