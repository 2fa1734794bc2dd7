"""report.json (everything, for machines) and report.md / the console table (what a person needs)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import List, Optional


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("hfquant", "torch", "transformers", "accelerate", "datasets", "bitsandbytes", "huggingface_hub", "hydra-core"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


def percent_change(new: float, base: float) -> str:
    """`+1.23%`; a change that rounds to nothing reads `0.00%`, not `-0.00%`."""
    change = (new / base - 1) * 100
    return "0.00%" if abs(change) < 0.005 else f"{change:+.2f}%"


def summary_rows(report: dict) -> List[List[str]]:
    """[metric, baseline, quantized, change] rows shared by the console table and report.md."""
    b, q = report["baseline"], report["quantized"]
    rows = []
    bp, qp = b.get("perplexity", {}).get("perplexity"), q.get("perplexity", {}).get("perplexity")
    if bp is not None and qp is not None:
        rows.append(["perplexity", f"{bp:.4f}", f"{qp:.4f}", percent_change(qp, bp)])
        rows.append(["KL divergence (nats/token)", "0", f"{q['perplexity']['kl_divergence']:.5f}", ""])
        rows.append(["top-1 agreement", "100%", f"{q['perplexity']['top1_agreement'] * 100:.2f}%", ""])
    cmp = report.get("comparison") or {}
    rtn = (cmp.get("rtn") or {}).get("perplexity", {}).get("perplexity")
    if bp is not None and rtn is not None:
        rows.append(["perplexity, round-to-nearest instead", f"{bp:.4f}", f"{rtn:.4f}", percent_change(rtn, bp)])
    ood = cmp.get("out_of_domain") or {}
    obp = (ood.get("baseline") or {}).get("perplexity", {}).get("perplexity")
    oqp = (ood.get("quantized") or {}).get("perplexity", {}).get("perplexity")
    if obp is not None and oqp is not None:
        rows.append([f"perplexity out of calibration domain ({ood.get('dataset')})", f"{obp:.4f}", f"{oqp:.4f}",
                     percent_change(oqp, obp)])
        ortn = (ood.get("rtn") or {}).get("perplexity", {}).get("perplexity")
        if ortn is not None:
            rows.append([f"… round-to-nearest instead ({ood.get('dataset')})", f"{obp:.4f}", f"{ortn:.4f}",
                         percent_change(ortn, obp)])
    emb = q.get("embedding-similarity")
    if emb:
        rows.append(["embedding cosine (mean / min)", "1 / 1", f"{emb['cosine_mean']:.5f} / {emb['cosine_min']:.5f}", ""])
    bs, qs = b.get("size", {}), q.get("size", {})
    if qs.get("bytes_on_disk"):
        rows.append(["size on disk", _fmt_bytes(bs.get("bytes")), _fmt_bytes(qs["bytes_on_disk"]),
                     f"{qs['bytes_on_disk'] / bs['bytes']:.3f}×" if bs.get("bytes") else ""])
        rows.append(["bits per parameter", f"{bs.get('bits_per_parameter', 0):.2f}", f"{qs['bits_per_parameter']:.2f}", ""])
    return rows


def table(rows: List[List[str]], header=("metric", "baseline", "quantized", "change")) -> str:
    widths = [max(len(str(r[i])) for r in [list(header)] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def gguf_source(model_cfg: dict) -> str:
    """Where the unquantized baseline came from when the model was read from a GGUF file: its dequantized weights."""
    gguf = model_cfg.get("gguf_file")
    return (f" (read from its GGUF file `{gguf}`, dequantized to float32 on load: that float32 model is the "
            "unquantized baseline below)") if gguf else ""


def markdown(report: dict) -> str:
    run = report["run"]
    lines = [
        f"# hfquant report: {run['model']} — {run['scheme']}",
        "",
        f"Model `{run['model']}`{gguf_source(run)}.",
        "",
        f"Scheme `{run['scheme']}`, algorithms {algorithm_list(report)}"
        f"{' (' + run['algorithm_reason'] + ')' if run.get('algorithm_reason') else ''}, observer `{run['observer']}`, "
        f"backend `{run['backend']}` ({run['backend_reason']}).",
        "",
        table(summary_rows(report)),
        "",
        "## Protocol",
        "",
        "Evaluation (the table's first rows):",
        "",
    ]
    lines += [f"- **{key}**: {readable(value)}" for key, value in report.get("protocol", {}).items()]
    ood = (report.get("comparison") or {}).get("out_of_domain") or {}
    if ood.get("protocol"):
        lines += ["", f"Out of the calibration domain (`{ood.get('dataset')}`, the rows that name it):", ""]
        lines += [f"- **{key}**: {readable(value)}" for key, value in ood["protocol"].items()]
    q = report.get("quantization", {})
    lines += ["", "## Quantization", "",
              f"- modules quantized: {q.get('modules')}; ignored: "
              f"{', '.join(n for n in q.get('ignore', []) if n not in reported_apart(q)) or 'none'}",
              *[f"- left unquantized: `{name}` — {why}" for name, why in q.get("left_unquantized", {}).items()],
              *([embedding_line(q).rstrip()] if q.get("embedding") else []),
              (f"- weight SQNR: {q['weight_sqnr_db']:.2f} dB (relative weight MSE {q['weight_relative_mse']:.3e})"
               if "weight_sqnr_db" in q else "- weight SQNR: not measured (the backend quantizes with its own statistics)"),
              f"- calibration: {report.get('calibration', {}).get('status')}",
              f"- reload check (max |Δlogit|, reloaded vs in memory): {report.get('reload_check', {}).get('max_abs_logit_difference')}",
              "", "## Timings (s) and memory", ""]
    for stage, secs in report.get("timings", {}).items():
        lines.append(f"- {stage}: {secs:.1f}")
    lines.append(f"- peak RSS: {_fmt_bytes(report.get('peak_memory', {}).get('rss_bytes'))}")
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()), ""]
    return "\n".join(lines)


def readable(value) -> str:
    """A protocol value for people: `name pydoc, source …` rather than a Python dict's repr."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {readable(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(v) for v in value)
    return str(value)


def windows_summary(protocol: dict) -> str:
    """Calibration windows in one phrase for the status line (the full protocol is recorded beside it):
    `32 windows × 512 tokens of pydoc (16 of them written by the model), token sha256 ff58…`."""
    dataset = protocol.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else dataset
    generated = protocol.get("generated")
    written = (f" ({generated['windows']} of them written by the model"
               f"{', shipped with hfquant' if generated.get('shipped') else ''})"
               if isinstance(generated, dict) and generated.get("windows") else "")
    digest = f", token sha256 {protocol['token_sha256']}" if protocol.get("token_sha256") else ""
    return f"{protocol.get('num_samples')} windows × {protocol.get('seq_len')} tokens of {name}{written}{digest}"


def algorithm_list(report: dict) -> str:
    """`awq`, `gptq` (dampening=0.1): the algorithms that ran, in order, each with the options it was given."""
    options = report.get("run", {}).get("algorithm_options") or {}
    names = report.get("quantization", {}).get("algorithms") or ["rtn"]
    return ", ".join(f"`{a}`" + (" (" + ", ".join(f"{k}={v}" for k, v in options[a].items()) + ")" if options.get(a) else "")
                     for a in names)


def reported_apart(report_quant: dict) -> set:
    """Modules the embedding entry of the report describes (kept out of the Linears' bits per weight)."""
    entry = report_quant.get("embedding") or {}
    return {entry["module"], *([entry["head"]] if entry.get("head") else [])} if entry else set()


def embedding_line(report_quant: dict) -> str:
    """The card's / report's line on the embedding (empty when it stayed in floating point), ending in a newline."""
    entry = report_quant.get("embedding")
    if not entry:
        return ""
    return (f"- embedding `{entry['module']}`: {entry['codes']}, {entry['bytes'] / 1e6:.1f} MB instead of "
            f"{entry['float_bytes'] / 1e6:.1f} MB (scheme.embedding); `{entry.get('head') or 'lm_head'}`: {entry['lm_head']}\n")
