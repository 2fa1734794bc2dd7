"""`hfquant -m ...` writes a summary table (markdown + CSV) and a plot in the sweep folder."""

import csv
import subprocess
import sys

from tests.conftest import tiny_overrides


def test_multirun_writes_summary_table_and_plot(tiny_llm_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_llm_dir, "x") if not o.startswith("output_dir")]
    cmd = [sys.executable, "-m", "hfquant", "-m", "scheme=w8a16,int8-tensor", "observer=minmax,mse",
           f"hydra.sweep.dir={sweep}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert {(r["scheme"], r["observer"]) for r in rows} == {
        ("w8a16", "minmax"), ("w8a16", "mse"), ("int8-tensor", "minmax"), ("int8-tensor", "mse")}
    md = (sweep / "summary.md").read_text()
    assert "| scheme | observer |" in md and "Baseline perplexity" in md
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "sweep summary:" in result.stdout
    # Each run's own folder is a complete run.
    assert all((sweep / r["output_dir"] / "model" / "config.json").exists() for r in rows)


def test_joblib_launcher_runs_jobs_in_parallel_processes_with_the_same_summary(tiny_llm_dir, tmp_path):
    """Hydra's launcher plugins fan a sweep out (joblib here; submitit for SLURM is configured the same way)."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_llm_dir, "x") if not o.startswith("output_dir")]
    cmd = [sys.executable, "-m", "hfquant", "-m", "scheme=w8a16,int8-tensor", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["scheme"] for r in rows) == ["int8-tensor", "w8a16"]
    assert all((sweep / r["output_dir"] / "report.json").exists() for r in rows)
