"""After a multirun sweep: a summary table (markdown + CSV) and a plot of perplexity against bits/parameter.

A job that fails does not stop the sweep: `recorded_failure` writes `failed.json` (its overrides and the one
error line) in the job's folder and lets the next job run (Hydra's sweeper would stop the sweep, and our CLI's
exit would skip the summary); the summary lists the failures, and the command exits 2 when any job failed.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import sys
import traceback
from contextlib import contextmanager
from typing import List

from hydra.experimental.callback import Callback

from .errors import HfquantError
from .redact import redact_text

log = logging.getLogger("hfquant")

FAILED = "failed.json"
failed_jobs: List[dict] = []  # set when a sweep ends: what the CLI turns into its exit status

COLUMNS = ["scheme", "observer", "backend", "bits_per_parameter", "perplexity", "perplexity_change_pct",
           "kl_divergence", "top1_agreement", "weight_sqnr_db", "size_mb", "quantize_s", "output_dir"]


def collect(sweep_dir: str) -> List[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "report.json"))):
        if os.path.exists(os.path.join(os.path.dirname(path), FAILED)):
            continue  # this sweep's job failed; the report is an earlier run's
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        ppl = r["quantized"].get("perplexity", {})
        base = r["baseline"].get("perplexity", {}).get("perplexity")
        rows.append({
            "scheme": r["run"]["scheme"], "observer": r["run"]["observer"], "backend": r["run"]["backend"],
            "bits_per_parameter": round(r["quantized"]["size"]["bits_per_parameter"], 3),
            "perplexity": ppl.get("perplexity"),
            "perplexity_change_pct": (ppl["perplexity"] / base - 1) * 100 if ppl and base else None,
            "kl_divergence": ppl.get("kl_divergence"), "top1_agreement": ppl.get("top1_agreement"),
            "weight_sqnr_db": r["quantization"].get("weight_sqnr_db"),
            "size_mb": r["quantized"]["size"]["bytes_on_disk"] / 1e6,
            "quantize_s": sum(r["timings"].get(stage, 0) for stage in ("plan", "calibrate", "quantize")),
            "output_dir": os.path.relpath(os.path.dirname(path), sweep_dir),
            "_baseline_perplexity": base,
        })
    return sorted(rows, key=lambda r: (r["bits_per_parameter"], r["perplexity"] or 0))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "—" if v is None else str(v)


def collect_failures(sweep_dir: str) -> List[dict]:
    """Every `failed.json` of the sweep, by job number."""
    failures = []
    for path in glob.glob(os.path.join(sweep_dir, "*", FAILED)):
        try:
            with open(path, encoding="utf-8") as f:
                failures.append(dict(json.load(f), job_dir=os.path.relpath(os.path.dirname(path), sweep_dir)))
        except (OSError, ValueError) as exc:
            failures.append({"job": None, "overrides": [], "error": f"unreadable {FAILED}: {exc}",
                             "job_dir": os.path.relpath(os.path.dirname(path), sweep_dir)})
    return sorted(failures, key=lambda f: (f.get("job") is None, f.get("job") or 0, f["job_dir"]))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def failures_markdown(failures: List[dict]) -> List[str]:
    if not failures:
        return []
    md = ["", f"## Failed jobs ({len(failures)})", "", "| job | overrides | error |", "|---|---|---|"]
    md += [f"| {_cell(f['job_dir'])} | {_cell(' '.join(f.get('overrides') or []))} | {_cell(f.get('error'))} |"
           for f in failures]
    return md


def write_summary(sweep_dir: str) -> List[str]:
    """Write summary.md, summary.csv and (with matplotlib) summary.png; returns the paths written. Failed jobs
    are listed in summary.md (alone when no job finished)."""
    rows, failures = collect(sweep_dir), collect_failures(sweep_dir)
    md_path = os.path.join(sweep_dir, "summary.md")
    if not rows:
        log.warning("no finished runs (report.json) under %s: no summary table written", sweep_dir)
        if not failures:
            return []
        with open(md_path, "w", encoding="utf-8") as f:
            f.write("\n".join(["# Sweep summary (0 runs finished)", *failures_markdown(failures)]) + "\n")
        return [md_path]
    written = []
    csv_path = os.path.join(sweep_dir, "summary.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    written.append(csv_path)
    base = rows[0]["_baseline_perplexity"]
    title = f"{len(rows)} runs" + (f", {len(failures)} failed" if failures else "")
    md = [f"# Sweep summary ({title})", "",
          f"Baseline perplexity: {_fmt(base)} (same windows for every run). Sorted by bits per parameter, then perplexity.", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    md += failures_markdown(failures)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    written.append(md_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: summary.png skipped (pip install matplotlib)")
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["perplexity"] is None:
            continue
        ax.scatter(r["bits_per_parameter"], r["perplexity"])
        ax.annotate(f"{r['scheme']}/{r['observer']}", (r["bits_per_parameter"], r["perplexity"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if base:
        ax.axhline(base, linestyle="--", color="gray", label="baseline")
        ax.legend()
    ax.set_xlabel("bits per parameter (size on disk)")
    ax.set_ylabel("perplexity")
    ax.set_title("hfquant sweep")
    fig.tight_layout()
    png = os.path.join(sweep_dir, "summary.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    written.append(png)
    return written


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def error_line(exc: BaseException) -> str:
    """The one line the CLI would print for `exc` (as `hfquant.cli.reported_errors` words it)."""
    if isinstance(exc, HfquantError):
        return redact_text(str(exc))
    return redact_text(f"unexpected {type(exc).__name__}: {exc} (this is probably a bug in hfquant or a plugin; "
                       "the traceback is in this job's failed.json)")


@contextmanager
def recorded_failure():
    """In a multirun job: an error becomes `<job dir>/failed.json` plus one printed line, and the sweep goes on
    to the next job. Outside a multirun, and for Ctrl-C, errors pass through unchanged."""
    if not _in_multirun():
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    path = os.path.join(hc.runtime.output_dir, FAILED)
    if os.path.exists(path):
        os.remove(path)  # a sweep re-run into the same folder: this run decides
    try:
        yield
    except Exception as exc:
        overrides = [redact_text(o) for o in hc.overrides.task]
        record = {"job": hc.job.num, "overrides": overrides, "error": error_line(exc), "type": type(exc).__name__,
                  "traceback": redact_text(traceback.format_exc())}
        os.makedirs(hc.runtime.output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        print(f"hfquant: error: sweep job #{hc.job.num} ({' '.join(overrides)}): {record['error']}", file=sys.stderr)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("HFQUANT_VERBOSE") == "1":
            print(record["traceback"], file=sys.stderr)


class SweepFailedError(HfquantError, RuntimeError):
    """Some jobs of a sweep failed; the others were summarised."""


def raise_if_jobs_failed() -> None:
    """After a multirun: exit non-zero (via the CLI's one error line) when any job failed."""
    if failed_jobs:
        total = failed_jobs[0]["_jobs"]
        dirs = ", ".join(f["job_dir"] for f in failed_jobs)
        raise SweepFailedError(f"{len(failed_jobs)} of {total} sweep job(s) failed ({dirs}), listed above and in "
                               f"{failed_jobs[0]['_summary']}; the others were summarised")


class SweepSummary(Callback):
    """Hydra callback: summarises every finished run of a multirun and lists the failed ones."""

    def on_multirun_start(self, config, **kwargs) -> None:
        failed_jobs.clear()

    def on_multirun_end(self, config, **kwargs) -> None:
        paths = write_summary(config.hydra.sweep.dir)
        for p in paths:
            print(f"sweep summary: {p}")
        failures = collect_failures(config.hydra.sweep.dir)
        jobs = len(failures) + len(collect(config.hydra.sweep.dir))
        failed_jobs[:] = [dict(f, _jobs=jobs, _summary=os.path.join(config.hydra.sweep.dir, "summary.md")) for f in failures]
        for f in failed_jobs:
            print(f"sweep: {f['job_dir']} failed ({' '.join(f.get('overrides') or [])}): {f.get('error')}",
                  file=sys.stderr)
