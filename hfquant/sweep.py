"""After a multirun sweep: a summary table (markdown + CSV) and a plot of perplexity against bits/parameter."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from typing import List

from hydra.experimental.callback import Callback

log = logging.getLogger("hfquant")

COLUMNS = ["scheme", "observer", "backend", "bits_per_parameter", "perplexity", "perplexity_change_pct",
           "kl_divergence", "top1_agreement", "weight_sqnr_db", "size_mb", "quantize_s", "output_dir"]


def collect(sweep_dir: str) -> List[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "report.json"))):
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
            "quantize_s": r["timings"].get("calibrate", 0) + r["timings"].get("quantize", 0),
            "output_dir": os.path.relpath(os.path.dirname(path), sweep_dir),
            "_baseline_perplexity": base,
        })
    return sorted(rows, key=lambda r: (r["bits_per_parameter"], r["perplexity"] or 0))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "—" if v is None else str(v)


def write_summary(sweep_dir: str) -> List[str]:
    """Write summary.md, summary.csv and (with matplotlib) summary.png; returns the paths written."""
    rows = collect(sweep_dir)
    if not rows:
        log.warning("no finished runs (report.json) under %s: no summary written", sweep_dir)
        return []
    written = []
    csv_path = os.path.join(sweep_dir, "summary.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    written.append(csv_path)
    base = rows[0]["_baseline_perplexity"]
    md = [f"# Sweep summary ({len(rows)} runs)", "",
          f"Baseline perplexity: {_fmt(base)} (same windows for every run). Sorted by bits per parameter, then perplexity.", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    md_path = os.path.join(sweep_dir, "summary.md")
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


class SweepSummary(Callback):
    """Hydra callback: summarises every finished run of a multirun."""

    def on_multirun_end(self, config, **kwargs) -> None:
        paths = write_summary(config.hydra.sweep.dir)
        for p in paths:
            print(f"sweep summary: {p}")
