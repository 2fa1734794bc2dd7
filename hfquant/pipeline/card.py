"""The model card (README.md in the saved folder): Hub metadata plus what was done and what it cost.

Everything comes from the run's report, so the card says exactly what was measured; no token or secret is
ever read here.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from .report import algorithm_list, embedding_line, gguf_source, readable, reported_apart, summary_rows, table

PIPELINE_TAGS = {"causal-lm": "text-generation", "embedding": "feature-extraction"}


def base_license(source: str) -> Optional[str]:
    """The base model's license from its own card, when the source folder has one."""
    readme = os.path.join(source, "README.md") if os.path.isdir(source) else None
    if readme and os.path.isfile(readme):
        try:
            return ModelCard.load(readme).data.to_dict().get("license")
        except Exception:
            return None
    return None


NOT_REPRODUCED = ("output_dir", "hub", "overwrite", "resume", "hydra")  # where and how, not what
PLUGIN_OPTIONS = ("observer.options", "calibration", "evaluation")  # where `+key=` adds a plugin's own option


def reproduce_command(config: Optional[dict] = None) -> str:
    """The overrides that reproduce this run: this job's own (a sweep job's values, not the sweep's lists), only
    keys the config knows (`+key` only as a plugin option), never outputs, Hub settings, Hydra's own or
    secret-looking keys, and Hub tokens redacted."""
    from ..redact import redact_text

    kept = [redact_text(o) for o in _task_overrides() if _reproducible(o, config)]
    return "hfquant " + " ".join(kept) if kept else "hfquant"


def _task_overrides() -> list:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return [a for a in sys.argv[1:] if not a.startswith("-")]


def _reproducible(override: str, config: Optional[dict]) -> bool:
    from ..redact import is_secret_key

    key, sep, _ = override.partition("=")
    name = key.lstrip("+")
    if not sep or name.startswith("~") or is_secret_key(name) or name.split(".")[0].split("/")[0] in NOT_REPRODUCED:
        return False
    if config is None:
        return True
    if key.startswith("+") and name.rpartition(".")[0] not in PLUGIN_OPTIONS:
        return False  # added outside a plugin's options: not a key hfquant knows
    node = config
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def needs_hfquant_notice(backend: str, exported: bool = False, version: Optional[str] = None) -> str:
    """First thing a reader sees when the folder is in hfquant's own format (bitsandbytes and exported folders are not)."""
    from ..plugins import registries

    if exported or getattr(registries().backends.get(backend), "format", "hfquant") != "hfquant":
        return ""
    needed = f" {version} or later" if version else ""
    return (f"\n> **Loading this model needs hfquant**{needed} (the tool that wrote it): `pip install "
            "hfquant` (or `pip install .` in hfquant's source tree where your package index does not carry it), then "
            "`import hfquant` before `from_pretrained`. Without it, transformers refuses the folder (its integer codes "
            "are hfquant's format).\n")


UNQUANTIZED_EMBEDDING = ("- input embedding (and an lm_head tied to it): floating point — `scheme.embedding=int8` "
                         "quantizes them on the cpu and fake backends\n")


def load_section(export: Optional[dict], load_path: str, cpu_kernels: bool = False) -> str:
    """The card's loading snippet: hfquant's format, or the engines that read an exported folder. `cpu_kernels`:
    the folder runs on hfquant's CPU kernels, whose decode steps were measured faster compiled (every cpu scheme on an
    AVX2 CPU; w8a8 with int8 dot products not measured)."""
    if not export:
        compiled = ("hfquant.compile_decoding(model)  # optional, for long generations: the first generate in a "
                    "process compiles\n# (1-2 minutes on a 2-core CPU, silently), later ones decode faster; see "
                    "max_cache_len in hfquant's docs/usage.md\n" if cpu_kernels else "")
        return f"""
```python
import hfquant  # registers hfquant's format with transformers (not needed for bitsandbytes backends)
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{load_path}")
tokenizer = AutoTokenizer.from_pretrained("{load_path}")
{compiled}```
"""
    check = export.get("check") or {}
    checked = (f"It was loaded by {check['loaded_by']} and gave hfquant's logits (max |Δ| "
               f"{check['max_abs_logit_difference']:.2g})." if check.get("ok") else
               f"It was not loaded back here ({check.get('skipped', 'no check ran')}).")
    if export["format"] == "gguf":
        return f"""
The folder holds **{export['file']}** (GGUF, {', '.join(export.get('ggml_types') or [])}): no hfquant needed. {checked}

```
llama-cli -m {export['file']} -p "Hello"          # llama.cpp (after downloading the file)
```
```python
from transformers import AutoModelForCausalLM  # transformers dequantizes GGUF to float on load
model = AutoModelForCausalLM.from_pretrained("{load_path}", gguf_file="{export['file']}")
```
"""
    dequantize = export.get("load") == "dequantize"
    extra = ", quantization_config=CompressedTensorsConfig(dequantize=True)" if dequantize else ""
    note = ("\nAsymmetric zero points: transformers' default load (modules kept compressed) refuses their packed zero "
            "points, so pass `CompressedTensorsConfig(dequantize=True)` as above.\n" if dequantize else "")
    if export.get("group_format") == "int-quantized":
        note += ("\nActivations are quantized by the engine, per token: vLLM's int8 kernels use absmax/127 like hfquant "
                 "(the numbers above); transformers' compressed-tensors forward uses absmax/127.5, so its logits differ "
                 "slightly — the check above compared it against hfquant's codes under that rounding.\n")
    return f"""
The folder is in **{export['format']}** format ({export.get('group_format')}): no hfquant needed. {checked}

```python
# pip install transformers compressed-tensors
from transformers import AutoModelForCausalLM, AutoTokenizer{', CompressedTensorsConfig' if dequantize else ''}

model = AutoModelForCausalLM.from_pretrained("{load_path}"{extra})
tokenizer = AutoTokenizer.from_pretrained("{load_path}")
```
{note}
vLLM: `vllm serve {load_path}` (its compressed-tensors loader reads the same files; not run here).
"""


def render(report: dict, model_cfg: dict, repo_id: Optional[str] = None) -> str:
    run, scheme = report["run"], report["scheme"]
    tags = ["hfquant", run["scheme"], "quantized", f"backend-{run['backend']}"]
    export = report.get("export")
    if export:
        tags.append(export["format"])
    data = ModelCardData(
        base_model=model_cfg.get("base_model") or None,
        base_model_relation="quantized" if model_cfg.get("base_model") else None,
        library_name="gguf" if export and export["format"] == "gguf" else "transformers",
        tags=tags,
        pipeline_tag=PIPELINE_TAGS.get(run["task"]),
        license=model_cfg.get("license") or base_license(run["model_source"]),
    )
    cal = report.get("calibration", {})
    proto = report.get("protocol", {})
    windows = cal.get("windows")
    cal_lines = (f"- dataset: {readable(windows['dataset'])}, {windows['num_samples']} samples × {windows['seq_len']} tokens "
                 f"(seed {windows['seed']}), token-id sha256 {windows['token_sha256']}" if windows else f"- {cal.get('status')}")
    if windows and isinstance(windows.get("generated"), dict):
        cal_lines += (f"\n- of which {windows['generated']['windows']} windows were written by the model itself "
                      f"({windows['generated']['sampling']}), so the algorithms do not fit one narrow domain")
        if windows["generated"].get("shipped"):
            cal_lines += f" — {windows['generated']['shipped']}"
    elif windows and windows.get("generated"):
        cal_lines += f"\n- model-written windows: {windows['generated']}"
    load_path = repo_id or "path/to/this/folder"
    q = report.get("quantization", {})
    versions = report.get("versions", {})
    body = f"""
# {run['model']} — {run['scheme']} (hfquant)
{needs_hfquant_notice(run['backend'], bool(export), versions.get('hfquant'))}
Quantized from `{model_cfg.get('base_model') or run['model']}`{gguf_source(model_cfg)} with hfquant {versions.get('hfquant')}, evaluated
against the unquantized model on the same text.

## What was done

- scheme: `{run['scheme']}` — {scheme.get('description') or ''}
- weights: `{scheme.get('weights')}`
- activations: `{scheme.get('input_activations')}`
- algorithms: {algorithm_list(report)} (in order; the last chose the integer codes), layer inputs propagated {report.get('quantization', {}).get('propagate', 'quantized')}{'; chosen by algorithm=' + run['algorithm_reason'] if run.get('algorithm_reason') else ''}
- observer: `{run['observer']}` {run.get('observer_options') or ''}; backend: `{run['backend']}` ({run['backend_reason']})
- modules quantized: {q.get('modules')}; left unquantized: {', '.join([n for n in scheme.get('ignore') or [] if n not in reported_apart(q)] + list(q.get('left_unquantized') or {})) or 'none'}
{embedding_line(q) or UNQUANTIZED_EMBEDDING}- bits per parameter (size on disk / parameters): {report['quantized']['size']['bits_per_parameter']:.2f}

## Calibration data

{cal_lines}

## Evaluation

Protocol: {readable(proto.get('dataset'))}; {proto.get('windows')} windows × {proto.get('seq_len')} tokens, stride {proto.get('stride')};
BOS token: {proto.get('bos')}; scored per {proto.get('level')}. {proto.get('kl', '')}
Evaluation token-id sha256: {proto.get('token_sha256')}.

{table(summary_rows(report))}

## How to load it
{load_section(export, load_path, run['backend'] == 'cpu')}
## Reproduce

```
{reproduce_command(report.get("config"))}
```

## Versions

{', '.join(f'{k} {v}' for k, v in versions.items())}
"""
    from ..redact import redact_tokens

    return redact_tokens(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content)  # no Hub token, wherever it came from


def validate_metadata(content: str) -> dict:
    """Offline equivalent of the Hub's metadata check: YAML parses, required keys have valid values."""
    card = ModelCard(content)
    meta = card.data.to_dict()
    problems = []
    if meta.get("library_name") not in ("transformers", "gguf"):
        problems.append("library_name must be 'transformers' (or 'gguf' for a GGUF folder)")
    if "hfquant" not in (meta.get("tags") or []):
        problems.append("tags must include 'hfquant'")
    if meta.get("base_model") and meta.get("base_model_relation") != "quantized":
        problems.append("base_model_relation must be 'quantized'")
    if problems:
        raise ValueError("model card metadata: " + "; ".join(problems))
    return meta
