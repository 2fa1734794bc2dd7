"""One run: validate → load → data → baseline → calibrate → quantize → save → reload check → evaluate → report
(in memory), or validate → stream quantize → report for weight-only runs that evaluate nothing (streaming)."""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import logging
import os
import resource
import time
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ..allocator import keep_freed_memory
from ..auto_algorithm import named_recipe_warning
from ..config import ConfigError, RunSpec, validate, written_from
from ..errors import HfquantError
from ..redact import redact, redact_tokens
from ..plugins import registries
from . import data as data_mod
from .calibrate import build_plan
from .evaluate import evaluate_baseline, evaluate_quantized, make_evaluators, protocols, public
from .distributed import Ranks, ranks_from_env
from .load import check_model_source, checkpoint_folder, float_dtype, load_model, load_tokenizer
from .sequential import calibrate_sequentially
from .card import render as render_card
from .faults import fault_point
from .integrity import check_checkpoint
from .output import (RESUME_RECORD, OutputFolderError, discard_model, model_dir, read_json, read_resume_record, write_atomic, write_json,
                     write_resume_record)
from .safety import claim_output, interruption_message, no_space_message, resume_request, sigterm_as_interrupt
from .push import PushError, push
from . import embedding as embedding_mod
from .quantize import check_format_fits, check_model_fits, resolve_backend, scale_rounding
from .layerwise import changed_options, check_layers, make_chain, quantize_in_memory
from .generated import with_generated
from . import compare
from .report import markdown, reported_apart, summary_rows, table, versions, windows_summary
from .save import compare_with_reference, load_quantized, reload_check as check_reload, save_quantized
from .streaming import StreamingError, stream_quantize, streaming_problem
from .size import folder_bytes, quantized_weight_stats, state_bytes, unique_parameter_count

log = logging.getLogger("hfquant")


class Timer:
    """Time per stage, and the stage now running (what an interruption message names)."""

    def __init__(self) -> None:
        self.timings = {}
        self.current = "setup"
        self.kept: Optional[str] = None  # what stays in output_dir if the run stops now

    @contextmanager
    def stage(self, name: str):
        log.info("stage: %s", name)
        outer, self.current = self.current, name
        fault_point(f"stage:{name}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.current = outer  # not on the way out of an error: the message names the stage that failed


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. Linux's VmHWM belongs to the address space since exec; getrusage's
    ru_maxrss also counts the parent's memory at fork (a big launcher would inflate it), so it is the fallback."""
    found = _proc_bytes("/proc/self/status", "VmHWM:")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _proc_bytes(path: str, key: str):
    """A `key: N kB` line of a /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def choose_pipeline(spec: RunSpec, backend: str) -> Tuple[str, str]:
    """("streaming" | "in_memory", why). `pipeline=auto` streams whenever it can: same folder, bounded memory."""
    problem = streaming_problem(spec, backend)
    if spec.pipeline == "streaming":
        if problem:
            raise StreamingError(f"pipeline=streaming cannot run this: {problem}. Use pipeline=in_memory (or auto)")
        return "streaming", "asked for by pipeline=streaming"
    if spec.pipeline == "in_memory":
        return "in_memory", "asked for by pipeline=in_memory"
    if spec.resume:
        return "in_memory", "auto: resume re-checks and evaluates a loaded model"
    if problem:
        return "in_memory", f"auto: cannot stream: {problem}"
    if spec.scheme.needs_calibration_data:
        return "streaming", "auto: nothing to evaluate; static activations are calibrated one layer at a time"
    return "streaming", ("auto: nothing to evaluate and no calibration data needed (weights only, or activations "
                         "quantized at run time), so the model is never loaded whole")


def run(cfg: DictConfig) -> dict:
    """Run the pipeline for one composed config; returns the report (also written to output_dir)."""
    spec: RunSpec = validate(cfg)  # fails fast: nothing loaded yet
    keep_freed_memory()  # the quantizing loops' temporaries stay mapped (hfquant/allocator.py says why)
    data_mod.check_sources(spec)  # data files readable and text, before the model loads
    source = check_model_source(spec.model["path"], spec.model.get("gguf_file"), bool(spec.model.get("allow_pickle", False)))
    if os.path.isdir(source) and not spec.model.get("gguf_file"):
        check_checkpoint(source, spec.model.get("task", "causal-lm"), bool(spec.model.get("trust_remote_code", False)))
    ranks = ranks_from_env()
    if ranks.world > 1:
        spec.output_dir = ranks.broadcast(spec.output_dir)  # Hydra's timestamped folder may differ per process
        if spec.device.startswith("cuda") and ":" not in spec.device:
            spec.device = f"cuda:{ranks.local_rank}"
    backend, backend_reason = resolve_backend(spec.backend, spec.scheme, spec.device, spec.format)
    pipeline, pipeline_reason = choose_pipeline(spec, backend)
    timer = Timer()
    lock = None
    try:
        if ranks.main:
            lock = claim_output(spec, backend)
        ranks.barrier()
        with sigterm_as_interrupt():
            return _run_locked(cfg, spec, ranks, backend, backend_reason, pipeline, pipeline_reason, timer)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interruption_message(timer.current, timer.kept)) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputFolderError(no_space_message(spec, timer.current)) from exc
        raise
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg, spec: RunSpec, ranks: Ranks, backend: str, backend_reason: str, pipeline: str,
                pipeline_reason: str, timer: Timer) -> dict:
    if pipeline == "streaming" and not ranks.main:
        log.info("rank %d: streaming runs in one process; nothing to do here", ranks.rank)
        ranks.barrier()
        return {}
    log.info("backend %s (%s)", backend, backend_reason)
    if spec.algorithm_auto:
        log.info("algorithm %s (auto: %s)", ",".join(spec.algorithms), spec.algorithm_reason)
    elif (warning := named_recipe_warning(spec.scheme, spec.algorithms)) is not None:
        log.warning("%s", warning)
    log.info("pipeline %s (%s)", pipeline, pipeline_reason)
    if pipeline == "streaming":
        try:
            report = _run_streaming(spec, backend, timer)
        finally:
            ranks.barrier()
    else:
        report = _run_in_memory(spec, backend, timer, ranks)
    if ranks.main and written_from(spec.format) != spec.format:
        with timer.stage("export"):
            report["export"] = export_model(spec, report.get("reload_check") or {})
        _size_of_export(report, model_dir(spec.output_dir))
    if ranks.world > 1:
        report["run"]["processes"] = ranks.world
    report["run"].update(backend=backend, backend_reason=backend_reason, pipeline=pipeline, pipeline_reason=pipeline_reason)
    report.update(timings=timer.timings,
                  peak_memory={"rss_bytes": peak_rss_bytes(),
                               **({"cuda_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_available() else {})},
                  versions=versions(), config=redact(OmegaConf.to_container(cfg, resolve=True)))
    report = redact_tokens(report)  # nothing that looks like a Hub token is ever written
    if not ranks.main:
        return report  # rank 0 writes the report, card and (if asked) pushes
    return _finish(report, spec, timer)


def narrowed(spec: RunSpec, names, dropped) -> RunSpec:
    """The spec once algorithm=auto dropped what the model's layout does not allow (unchanged otherwise)."""
    if not dropped:
        return spec
    return dataclasses.replace(spec, algorithms={n: spec.algorithms[n] for n in names if n in spec.algorithms},
                               algorithm_reason="; ".join([spec.algorithm_reason, *dropped]))


def _run_header(spec: RunSpec, source: str) -> dict:
    m = spec.model
    return {"model": m.get("name") or m["path"], "model_source": source,
            **({"gguf_file": m["gguf_file"]} if m.get("gguf_file") else {}), "task": m.get("task", "causal-lm"),
            "scheme": spec.scheme.name, "observer": spec.observer, "observer_options": spec.observer_options,
            "algorithms": list(spec.algorithms),
            **({"algorithm_options": options} if (options := changed_options(spec.algorithms)) else {}),
            **({"algorithm_reason": f"auto: {spec.algorithm_reason}"} if spec.algorithm_auto else {}),
            "output_dir": os.path.abspath(spec.output_dir), "resumed": spec.resume}


def _run_streaming(spec: RunSpec, backend: str, timer: Timer) -> dict:
    m = spec.model
    static = spec.scheme.needs_calibration_data
    learns = spec.algorithms_need_data
    with timer.stage("load"):
        folder, source = checkpoint_folder(m["path"], m.get("gguf_file"), m.get("dtype", "float32"),
                                           bool(m.get("trust_remote_code", False)), m.get("revision"),
                                           bool(m.get("allow_pickle", False)))
        if not m.get("gguf_file") and folder != source:  # fetched from the Hub: check it as a local one is
            check_checkpoint(folder, m.get("task", "causal-lm"), bool(m.get("trust_remote_code", False)))
        token_ids = learns and not static and hasattr(registries().datasets.get(spec.calibration.name), "token_windows")
        tokenizer = load_tokenizer(folder, bool(m.get("trust_remote_code", False)), required=(static or learns) and not token_ids)
        if spec.format != "auto":  # a format's shape refusals come before any data is read (meta skeleton: no memory)
            from .streaming import build_skeleton

            skeleton = build_skeleton(folder, m.get("task", "causal-lm"), "float32", bool(m.get("trust_remote_code", False)), None)
            check_format_fits(skeleton.model, spec.scheme, spec.format)
    calib_windows = None
    if static or learns:
        with timer.stage("data"):
            vocab = None
            if token_ids:
                from transformers import AutoConfig

                vocab = AutoConfig.from_pretrained(folder, trust_remote_code=bool(m.get("trust_remote_code", False))).vocab_size
            calib_windows = data_mod.windows(tokenizer, spec, "calibration", vocab_size=vocab)
            if learns and spec.calibration.generated:
                calib_windows.protocol["generated"] = "skipped: streaming never loads the whole model to sample from it"

    def calibrate(tensors, dtype):
        with timer.stage("calibrate (layer by layer)"):
            return calibrate_sequentially(folder, tensors, spec, calib_windows, registries().observers.get(spec.observer), dtype)

    with timer.stage("stream quantize"):
        streamed = stream_quantize(folder, spec, backend, tokenizer, spec.output_dir, spec.max_shard_size, calibrate,
                                   calib_windows if learns else None)
        write_resume_record(spec.output_dir, resume_request(spec, backend))
        timer.kept = "model/ was saved; resume=true reuses it"
    spec = narrowed(spec, streamed["quantization"]["algorithms"], streamed["quantization"].get("algorithms_dropped"))
    if static:
        status = f"static activations observed layer by layer on {windows_summary(calib_windows.protocol)}"
    elif learns:
        status = f"algorithm {', '.join(spec.algorithms)} learned from layer inputs, layer by layer, on {windows_summary(calib_windows.protocol)}"
    else:
        status = "skipped: weights are quantized directly, tensor by tensor (streaming)"
    return _report(spec, _run_header(spec, source), status, calib_windows, streamed["baseline_bytes"],
                   streamed["parameters"], quantization=streamed["quantization"])


def _run_in_memory(spec: RunSpec, backend: str, timer: Timer, ranks: Ranks) -> dict:
    m = spec.model
    calibrate = bool(spec.calibration and (spec.scheme.needs_calibration_data or spec.algorithms_need_data) and not spec.resume)
    need_tokenizer = bool(spec.evaluation or calibrate)
    with timer.stage("load"):
        loaded = load_model(m["path"], m.get("task", "causal-lm"), m.get("gguf_file"), m.get("dtype", "float32"),
                            m.get("device_map"), bool(m.get("trust_remote_code", False)),
                            bool(m.get("allow_pickle", False)), m.get("revision"), need_tokenizer=need_tokenizer,
                            max_memory=m.get("max_memory"))
    model = loaded.model
    placement = check_placement(model)
    if m.get("device_map") is None and spec.device != "cpu":
        model.to(spec.device)
    chain = make_chain(spec.algorithms, spec.propagate)
    if not spec.resume:
        check_model_fits(model, spec.scheme, backend)  # before any data is read or evaluated
        embedding_mod.check_embedding(model, spec.scheme)
        check_format_fits(model, spec.scheme, spec.format)
        # e.g. awq on a layout it cannot fold into: refused now, not after the baselines (dropped under algorithm=auto)
        dropped = check_layers(chain, model, spec.algorithm_auto)
        spec = narrowed(spec, chain.names, dropped)
    params, baseline_bytes = unique_parameter_count(model), state_bytes(model)

    eval_windows = calib_windows = ood_windows = None
    with timer.stage("data"):
        if spec.evaluation:
            eval_windows = data_mod.windows(loaded.tokenizer, spec, "evaluation")
            ood_windows = compare.out_of_domain_windows(loaded.tokenizer, spec)
        if calibrate:
            calib_windows = data_mod.windows(loaded.tokenizer, spec, "calibration")

    evaluators = make_evaluators(spec.evaluation.evaluators, batch_size=spec.evaluation.batch_size) if spec.evaluation else {}
    baseline, comparison = {}, {}
    if spec.evaluation:
        with timer.stage("evaluate baseline"):
            baseline = evaluate_baseline(model, eval_windows, evaluators, loaded.fingerprint, ranks=ranks)
            if ood_windows is not None:
                comparison["baseline_out_of_domain"] = evaluate_baseline(model, ood_windows, evaluators, loaded.fingerprint,
                                                                         ranks=ranks)

    if spec.resume:
        del model
        qmodel, report_quant, reload_check = _resume_quantized(spec, timer)
        calibration_status = "reused from the finished run (resume=true)"
    else:
        own_format = getattr(registries().backends.get(backend), "format", "hfquant") == "hfquant"
        # "plan": weight ranges only — algorithms that learn from the calibration windows do it in "quantize"
        with timer.stage("calibrate" if calib_windows is not None and spec.scheme.needs_calibration_data else "plan"):
            obs_cls = registries().observers.get(spec.observer)
            plan = build_plan(model, spec.scheme, spec.observer, obs_cls, spec.observer_options, calib_windows,
                              observe=own_format)
        if compare.wants_rtn_reference(spec, own_format):
            with timer.stage("evaluate round-to-nearest"):  # before the algorithms edit the model's weights
                sets = {"rtn": (eval_windows, baseline)}
                if ood_windows is not None:
                    sets["rtn_out_of_domain"] = (ood_windows, comparison["baseline_out_of_domain"])
                comparison.update(compare.cached_rtn_scores(model, spec, backend, loaded.fingerprint, sets, evaluators, ranks))
        if own_format and chain.requires_data and spec.calibration.generated and not _can_generate(model):
            calib_windows.protocol["generated"] = f"skipped: {type(model).__name__} does not generate text"
        elif own_format and chain.requires_data and spec.calibration.generated:
            with timer.stage("sample calibration text"):  # algorithms also learn from text the model writes
                calib_windows = with_generated(model, loaded.fingerprint, calib_windows, spec.calibration.generated,
                                               spec.calibration.seed, weights_source=loaded.source)
        calibration_status = _calibration_status(spec, backend, own_format, calib_windows)
        with timer.stage("quantize"):
            targets = len(plan.modules)  # the scheme's; an lm_head quantized with the embedding is reported with it
            report_quant = {"modules": targets, "ignore": list(spec.scheme.ignore)}
            round_scale = None
            if own_format:
                round_scale = scale_rounding(backend, spec.format, float_dtype(model), spec.scheme, spec.format_options)
                make_observer = lambda args: obs_cls(args, **spec.observer_options)  # noqa: E731
                report_quant.update(quantize_in_memory(model, plan, chain, make_observer, round_scale, calib_windows),
                                    algorithms=chain.names, propagate=spec.propagate)
            qmodel, embedding = embedding_mod.convert_with_embedding(model, spec.scheme, plan, backend, round_scale)
            if embedding:
                report_quant["embedding"] = embedding
            left = getattr(qmodel, "hfquant_left_unquantized", {})  # a backend's kernels could not run these
            if left:
                report_quant.update(modules=targets - len(left), left_unquantized=left)
        check_ids = eval_windows.input_ids[:1, : min(128, eval_windows.input_ids.shape[1])] if eval_windows is not None else None
        reload_check = _save_and_check(spec, backend, timer, ranks, qmodel, loaded.tokenizer, plan, own_format, check_ids)
    report_quant.update(quantized_weight_stats(qmodel, exclude=reported_apart(report_quant)))

    quantized = {}
    if spec.evaluation:
        with timer.stage("evaluate quantized"):
            quantized = evaluate_quantized(qmodel, eval_windows, evaluators, baseline, ranks)
            if ood_windows is not None:
                comparison["quantized_out_of_domain"] = compare.score(qmodel, ood_windows, evaluators,
                                                                      comparison["baseline_out_of_domain"], ranks)
    header = _run_header(spec, loaded.source)
    if placement:
        header["device_map"] = placement
    report = _report(spec, header, calibration_status, calib_windows, baseline_bytes, params, baseline, quantized,
                     dict(eval_windows.protocol if eval_windows is not None else {}, **protocols(evaluators)),
                     report_quant, reload_check)
    if comparison:
        report["comparison"] = {
            "out_of_domain": {"dataset": spec.evaluation.out_of_domain, "protocol": compare.describe(ood_windows),
                              "baseline": {k: public(v) for k, v in comparison.get("baseline_out_of_domain", {}).items()},
                              "quantized": comparison.get("quantized_out_of_domain", {}),
                              **({"rtn": comparison["rtn_out_of_domain"]} if "rtn_out_of_domain" in comparison else {})},
            **({"rtn": comparison["rtn"]} if "rtn" in comparison else {}),
        }
    return report


def _can_generate(model) -> bool:
    try:
        return bool(model.can_generate())
    except AttributeError:
        return False


def _calibration_status(spec: RunSpec, backend: str, own_format: bool, calib_windows) -> str:
    if not own_format:
        return f"skipped: backend {backend} quantizes with its own statistics (observers and algorithms do not apply)"
    uses = [what for what, needed in (("static activations observed", spec.scheme.needs_calibration_data),
                                      ("algorithm " + ", ".join(spec.algorithms) + " learned from layer inputs",
                                       spec.algorithms_need_data)) if needed]
    if uses:
        return f"{' and '.join(uses)} on {windows_summary(calib_windows.protocol)}"
    return "skipped: the algorithms are data-free and activations are dynamic or not quantized"


def _report(spec: RunSpec, header: dict, calibration_status: str, calib_windows, baseline_bytes: int, params: int,
            baseline=None, quantized=None, protocol=None, quantization=None, reload_check=None) -> dict:
    """The report both pipelines write (sizes from the folder on disk; metrics only when evaluated)."""
    on_disk = folder_bytes(model_dir(spec.output_dir))
    return {
        "run": header,
        "scheme": spec.scheme.to_dict(),
        "protocol": protocol or {},
        "calibration": {"status": calibration_status, **({"windows": calib_windows.protocol} if calib_windows else {})},
        "baseline": {**{k: public(v) for k, v in (baseline or {}).items()},
                     "size": {"bytes": baseline_bytes, "parameters": params, "bits_per_parameter": 8 * baseline_bytes / params}},
        "quantized": {**{k: public(v) for k, v in (quantized or {}).items()},
                      "size": {"bytes_on_disk": on_disk, "bits_per_parameter": 8 * on_disk / params}},
        "quantization": quantization or {},
        "reload_check": reload_check or {},
    }


def check_placement(model) -> dict:
    """Modules per device when `model.device_map` spread the model; refuses weights left on disk or meta, which
    quantization cannot read (they are loaded only inside forward hooks)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {}
    counts = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    offloaded = [name for name, device in device_map.items() if str(device) in ("disk", "meta")]
    if offloaded:
        raise ConfigError(
            f"model.max_memory left {'the whole model' if offloaded == [''] else f'{len(offloaded)} module(s) (e.g. {offloaded[0]!r})'} "
            "offloaded to disk; quantizing "
            "needs every weight in memory — raise model.max_memory, or use pipeline=streaming (weight-only schemes, "
            "calibration layer by layer), which never loads the whole model")
    return counts


def _finish(report: dict, spec: RunSpec, timer: Timer) -> dict:
    """Model card, report.md, report.json (last: it marks the run complete), the console table, then push."""
    out_model = model_dir(spec.output_dir)
    reload_check = report["reload_check"]
    repo_id = spec.hub.get("repo_id") if spec.hub.get("push") else None
    write_atomic(os.path.join(out_model, "README.md"), render_card(report, spec.model, repo_id))
    write_atomic(os.path.join(spec.output_dir, "report.md"), markdown(report))
    write_json(os.path.join(spec.output_dir, "report.json"), report)  # marks the run complete
    print("\n" + table(summary_rows(report)))  # its own line even where a progress bar's \r shares the file (2>&1)
    print(f"\nsaved to {out_model}; report in {os.path.join(spec.output_dir, 'report.md')}")
    if spec.hub.get("push"):
        if not reload_check.get("ok"):
            raise PushError("refusing to push: the saved folder was not checked against the quantized model "
                               f"({reload_check or 'no reload check ran: evaluation=none or no reference from the first run'})")
        with timer.stage("push"):
            report["push"] = push(out_model, spec.hub["repo_id"], bool(spec.hub.get("private")), spec.hub.get("revision"),
                                  spec.hub.get("commit_message"), bool(spec.hub.get("dry_run")))
        write_json(os.path.join(spec.output_dir, "report.json"), report)
        p = report["push"]
        if p["dry_run"]:
            print(f"\ndry run: would upload to {p['repo_id']}@{p['revision']} ({p['bytes']} bytes):")
            for f in p["files"]:
                print(f"  {f['path']}  {f['size']} bytes")
        else:
            print(f"\npushed to {p['url']} (commit {p['commit']})")
    return report


def _save_and_check(spec: RunSpec, backend: str, timer: Timer, ranks: Ranks, qmodel, tokenizer, plan, own_format: bool,
                    check_ids) -> dict:
    """Save `model/`, reload it and compare logits; only a model that passed (or had nothing to check against)
    is recorded for `resume`. A failure or an interruption before that removes the folder this run wrote."""
    out_model = model_dir(spec.output_dir)
    reload_check = {}
    if not ranks.main:
        ranks.barrier()
        return reload_check
    try:
        with timer.stage("save"):
            save_quantized(qmodel, tokenizer, plan, backend, spec.output_dir, own_format=own_format,
                           max_shard_size=spec.max_shard_size)
            ranks.barrier()
        if check_ids is not None:
            with timer.stage("reload check"):
                extra = {} if spec.device == "cpu" else {"device_map": {"": spec.device}}
                reloaded = load_quantized(out_model, spec.model.get("task", "causal-lm"), **extra)
                reload_check = check_reload(qmodel, reloaded, check_ids)
                del reloaded
                if not reload_check["ok"]:
                    raise ReloadCheckError(
                        f"the saved model does not reproduce the quantized model (max |Δlogit| = "
                        f"{reload_check['max_abs_logit_difference']:.3g}); model/ was removed, not reported. This is a "
                        "bug in the backend's save/load path: report it with --verbose output")
        write_resume_record(spec.output_dir, resume_request(spec, backend), reload_check.get("reference"))
    except BaseException:
        discard_model(spec.output_dir)
        raise
    timer.kept = ("model/ was saved and checked; resume=true reuses it" if written_from(spec.format) == spec.format else
                  "model/ was saved and checked in hfquant's format (resume=true format=hfquant reuses it)")
    return reload_check


def export_model(spec: RunSpec, reload_check: dict) -> dict:
    """`format=` an export format: convert the checked hfquant `model/` into it, load the result with its consumer in
    a process without hfquant, and compare its logits with hfquant's reference forward of the same codes (max |Δ|
    ≤ 1e-4, as the reload check). Only then does the export replace `model/`; on any failure (or interruption)
    `model/` is the checked hfquant folder and no export or scratch file is left behind."""
    import shutil
    import tempfile

    fmt = registries().formats.get(spec.format)(spec.scheme, **spec.format_options)
    out_model = model_dir(spec.output_dir)
    tmp = os.path.join(spec.output_dir, f".tmp-export-{os.getpid()}")
    old = os.path.join(spec.output_dir, f".tmp-hfquant-{os.getpid()}")
    scratch = tempfile.mkdtemp(prefix=".tmp-verify-", dir=spec.output_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = fmt.export(out_model, tmp)
        check = _check_export(spec, fmt, out_model, tmp, scratch, reload_check)
        record = os.path.join(spec.output_dir, RESUME_RECORD)  # resume=true reuses hfquant folders only
        if os.path.exists(record):
            os.remove(record)
        os.rename(out_model, old)
        os.rename(tmp, out_model)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if not os.path.isdir(out_model) and os.path.isdir(old):
            os.rename(old, out_model)  # interrupted between the two renames: the checked hfquant folder comes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**summary, "check": check}


def _size_of_export(report: dict, folder: str) -> None:
    """Size rows describe the folder that is there now: the exported one (all files but the card)."""
    size = (report.get("quantized") or {}).get("size")
    params = ((report.get("baseline") or {}).get("size") or {}).get("parameters")
    if not size:
        return
    on_disk = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                  if n != "README.md" and os.path.isfile(os.path.join(folder, n)))
    size.update(bytes_on_disk=on_disk, **({"bits_per_parameter": 8 * on_disk / params} if params else {}))


def _check_export(spec: RunSpec, fmt, hfquant_folder: str, exported: str, scratch: str, reload_check: dict) -> dict:
    """Logits of the exported folder (its consumer, no hfquant) against hfquant's reference forward of the same
    codes — when both models fit in memory next to each other; otherwise skipped, and the report says so."""
    from ..formats.kernels import to_reference

    need = 2 * _float32_bytes(hfquant_folder)  # the reference here and the consumer's float model in the child
    available = _available_memory()
    if available is not None and need > available / 2:
        return {"ok": None, "skipped": f"the two float32 models would need ~{need / 2**30:.1f} GiB, more than half of the "
                f"{available / 2**30:.1f} GiB available; the layout is covered by the tests"}
    ids = torch.tensor([(reload_check.get("reference") or {}).get("input_ids") or list(range(1, 33))])
    extra = {} if fmt.reference_dtype is None else {"dtype": fmt.reference_dtype}
    with torch.no_grad():
        reference = to_reference(load_quantized(hfquant_folder, spec.model.get("task", "causal-lm"), **extra))
        reference = fmt.edit_reference(reference)(input_ids=ids).logits[0].float()
    logits = fmt.logits_elsewhere(exported, ids, scratch)
    diff = float((logits - reference).abs().max())
    if not diff <= 1e-4:
        raise ReloadCheckError(f"the {spec.format} folder loaded without hfquant does not reproduce hfquant's reference "
                               f"forward of the same codes (max |Δlogit| = {diff:.3g}); model/ keeps the hfquant "
                               "format. This is a bug in the export: report it with --verbose output")
    return {"max_abs_logit_difference": diff, "tokens": int(ids.numel()), "ok": True,
            "loaded_by": "transformers in a process where `import hfquant` fails",
            "against": fmt.reference_description()}


def _float32_bytes(folder: str) -> int:
    """What the folder's model takes in float32 (packed codes counted by the weights they hold), from headers."""
    from ..formats.safetensors_stream import read_header

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        modules = (json.load(f).get("quantization_config") or {}).get("modules") or {}
    total = 0
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        for name, info in read_header(path)[0].items():
            module, _, leaf = name.rpartition(".")
            bits = ((modules.get(module) or {}).get("weights") or {}).get("num_bits")
            total += 4 * (info.numel * 8 // bits if leaf == "weight_packed" and bits else info.numel)
    return total


def _available_memory():
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def _resume_quantized(spec: RunSpec, timer: Timer):
    """The finished `model/` (same request: checked before loading anything), re-checked against the logits
    recorded when it was written; a folder that no longer reproduces them is refused."""
    out_model = model_dir(spec.output_dir)
    log.info("resume: reusing the finished quantization in %s", out_model)
    with timer.stage("load quantized"):
        qmodel = load_quantized(out_model, spec.model.get("task", "causal-lm"))
    qcfg = qmodel.config.quantization_config
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    report_quant = {"modules": len(qcfg.get("modules", {})), "ignore": qcfg.get("ignore", []), "resumed": True,
                    "algorithms": list(spec.algorithms), "propagate": spec.propagate}  # the request it was checked against
    embedding = embedding_mod.entry_of_folder(qmodel, qcfg.get("modules", {}))
    if embedding:
        report_quant.update(modules=report_quant["modules"] - 1 - bool(embedding["head"]), embedding=embedding)
    reference = (read_resume_record(spec.output_dir) or {}).get("reload_reference") \
        or _previous_reload_reference(spec.output_dir)
    reload_check = compare_with_reference(qmodel, reference) if reference else {}
    if reload_check and not reload_check["ok"]:
        raise ReloadCheckError(
            f"resume=true, but {out_model!r} no longer reproduces the logits recorded when it was written (max "
            f"|Δlogit| = {reload_check['max_abs_logit_difference']:.3g}): its files were changed. Run without "
            "resume=true to quantize again (overwrite=true)")
    return qmodel, report_quant, reload_check


class ReloadCheckError(HfquantError, RuntimeError):
    """The saved folder does not give the logits of the model that was quantized."""


def _previous_reload_reference(output_dir: str):
    """The reload fingerprint in a report.json written before resume records existed."""
    return ((read_json(os.path.join(output_dir, "report.json")) or {}).get("reload_check") or {}).get("reference")
