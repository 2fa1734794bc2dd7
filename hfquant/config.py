"""Validate a composed Hydra config into a `RunSpec` before anything expensive happens.

Every error names the config key and the allowed values, so `hfquant observer=percentil` or
`scheme.weights.group_size=0` fail in milliseconds, before the model is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from .auto_algorithm import AUTO
from .auto_algorithm import choose as choose_algorithms
from .plugins import registries
from .quant import QuantArgsError
from .quant.args import MAX_BITS, MIN_BITS
from .registry import UnknownNameError
from .scheme import QuantScheme, SchemeError
from .errors import HfquantError

def _if_path(path, demo_path, then, otherwise=None):
    """`${hfquant.if_path:${.path},<demo path>,<value>,<else>}`: a model config's demo-only fields (its GGUF file,
    base model, license) apply only while model.path is still the demo's own path."""
    return then if path == demo_path else otherwise


if not OmegaConf.has_resolver("hfquant.if_path"):
    OmegaConf.register_new_resolver("hfquant.if_path", _if_path)

PIPELINES = ("auto", "streaming", "in_memory")
DATASET_PROTOCOL_KEYS = {"name", "num_samples", "seq_len", "seed", "max_windows", "evaluators", "batch_size", "generated",
                         "out_of_domain", "compare_rtn"}


class ConfigError(HfquantError, ValueError):
    """A bad config value; the message names the key and what is allowed."""


def backend_problem(name: str, scheme, device: str):
    """Why backend `name` cannot run `scheme` on `device` (its own `supports`), or None. A quantized embedding
    (`scheme.embedding`) is hfquant's format: a backend writing another format would drop it silently."""
    backend = registries().backends.get(name)
    reason = backend.supports(scheme, device)
    fmt = getattr(backend, "format", "hfquant")
    if reason is None and scheme.embedding is not None and fmt != "hfquant":
        reason = f"scheme.embedding={scheme.embedding} is stored in hfquant's format, and this backend writes {fmt}"
    return reason


@dataclass
class DataSpec:
    name: str
    options: Dict[str, Any]
    seq_len: int
    num_samples: int = 0
    seed: int = 0
    max_windows: Optional[int] = None
    evaluators: List[str] = field(default_factory=list)
    generated: int = 0  # calibration: extra windows sampled from the model itself (pipeline/generated.py)
    out_of_domain: Optional[str] = None  # evaluation: a second dataset outside the calibration domain (compare.py)
    compare_rtn: bool = False  # evaluation: also score round-to-nearest with the same scheme
    batch_size: Any = None  # evaluation: windows per forward (None: the evaluator's default, "auto")


@dataclass
class RunSpec:
    model: Dict[str, Any]
    scheme: QuantScheme
    observer: str
    observer_options: Dict[str, Any]
    backend: str  # may be "auto" until resolved
    calibration: Optional[DataSpec]
    evaluation: Optional[DataSpec]
    output_dir: str
    overwrite: bool
    resume: bool
    device: str
    hub: Dict[str, Any]
    pipeline: str = "auto"
    max_shard_size: Any = "5GB"
    algorithms: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {"rtn": {}})  # in order
    format: str = "auto"  # auto = the backend's format
    format_options: dict = field(default_factory=dict)  # the format's constructor options (format.<option>=)
    propagate: str = "quantized"
    algorithm_reason: str = ""  # why, when algorithm=auto chose `algorithms` ("" when they were named)

    @property
    def algorithm_auto(self) -> bool:
        return bool(self.algorithm_reason)

    @property
    def algorithms_need_data(self) -> bool:
        return any(getattr(registries().algorithms.get(n), "requires_data", False) for n in self.algorithms)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_config(node) else node


def _known(kind: str, name: str, key: str) -> None:
    try:
        getattr(registries(), kind).entry(name)
    except UnknownNameError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _check_options(cls, options: dict, key: str) -> None:
    """Options must be accepted by the plugin's constructor (checked without building anything heavy)."""
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    allowed = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"args"}
    allowed |= set(getattr(cls, "options", ()) or ())
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(f"{key}: unknown option(s) {sorted(unknown)} for {cls.__name__}; allowed: {sorted(allowed) or 'none'}")


def _positive_int(value, key: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _scheme(cfg) -> QuantScheme:
    raw = _plain(cfg.scheme)
    name = raw.get("name")
    _known("schemes", name, "scheme")
    try:
        return QuantScheme.from_dict(raw)
    except QuantArgsError as exc:
        part = "weights" if raw.get("weights") else "input_activations"
        raise ConfigError(f"scheme.{part}: {exc}") from None
    except (SchemeError, TypeError) as exc:
        raise ConfigError(f"scheme: {exc}") from None


def _data(node, key: str, need_samples: bool) -> Optional[DataSpec]:
    raw = _plain(node)
    if raw is None or raw.get("name") in (None, "none"):
        return None
    name = raw["name"]
    _known("datasets", name, f"{key}.name")
    options = {k: v for k, v in raw.items() if k not in DATASET_PROTOCOL_KEYS}
    _check_options(registries().datasets.get(name), options, key)
    spec = DataSpec(name, options, _positive_int(raw.get("seq_len"), f"{key}.seq_len"), seed=int(raw.get("seed", 0)))
    if need_samples:
        spec.num_samples = _positive_int(raw.get("num_samples"), f"{key}.num_samples")
        generated = raw.get("generated", 0)
        if generated != 0:
            spec.generated = _positive_int(generated, f"{key}.generated")
    else:
        spec.max_windows = _positive_int(raw.get("max_windows"), f"{key}.max_windows", allow_none=True)
        spec.evaluators = list(raw.get("evaluators") or [])
        spec.compare_rtn = bool(raw.get("compare_rtn", False))
        batch = raw.get("batch_size")
        if batch not in (None, "auto"):
            if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
                raise ConfigError(f"{key}.batch_size must be a positive integer or auto (one window per forward on "
                                  f"CPU, 8 on accelerators), got {batch!r}")
            spec.batch_size = batch
        ood = raw.get("out_of_domain")
        if ood not in (None, "", "none"):
            _known("datasets", str(ood), f"{key}.out_of_domain")
            spec.out_of_domain = str(ood)
        for ev in spec.evaluators:
            _known("evaluators", ev, f"{key}.evaluators")
    return spec


def _require_set(cfg: DictConfig) -> None:
    """A `???` left in the config (model=hub without model.path) is named before anything reads it."""
    missing = sorted(_missing_keys(cfg))
    if "model.path" in missing:
        raise ConfigError("model.path is not set; give a Hub id or a local folder, e.g. model.path=/models/foo")
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set, e.g. {missing[0]}=<value> on the command line")


def _missing_keys(node, prefix: str = "") -> List[str]:
    """Keys whose value is a literal `???` (OmegaConf.missing_keys would resolve `${.path}` and fail instead)."""
    if not isinstance(node, DictConfig):
        return []
    out = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            out.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key):
            out += _missing_keys(node._get_node(key), f"{prefix}{key}.")
    return out


def _check_hub(hub: dict, evaluation: Optional[DataSpec], resume: bool, output_dir: str) -> None:
    """A push that cannot happen fails now, not after the whole quantization: the repo id, a token, and the reload
    check the push requires (it runs on evaluation windows, or against a resumed run's recorded logits)."""
    if any("token" in str(k).lower() for k in hub):
        raise ConfigError("hub: never put a token in the config (it would be saved with the run); set HF_TOKEN "
                          "or run `hf auth login`")
    if not hub.get("push"):
        return
    if not hub.get("repo_id"):
        raise ConfigError("hub.push=true needs hub.repo_id=<org>/<name>")
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(hub["repo_id"]))
    except HFValidationError as exc:
        raise ConfigError(f"hub.repo_id={str(hub['repo_id'])!r} is not a Hub repo id: {exc} "
                          "E.g. hub.repo_id=<org>/<name>") from None
    if evaluation is None and not (resume and _recorded_reload_reference(output_dir)):
        raise ConfigError("hub.push=true with evaluation=none: the saved folder is reloaded and checked on evaluation "
                          "windows before anything is uploaded, and no evaluation means no check. Drop evaluation=none "
                          "(e.g. evaluation=pydoc), or push a run that was checked with resume=true hub.push=true")
    if hub.get("dry_run"):
        return
    try:
        token = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange (HF_OIDC_RESOURCE set)
        raise ConfigError(f"hub.push=true: reading the Hub token failed ({type(exc).__name__}: {exc})") from None
    if not token:
        raise ConfigError("hub.push=true needs a Hub token with write access: set HF_TOKEN or run `hf auth login` "
                          "(hub.dry_run=true lists what would be uploaded without one)")


def _recorded_reload_reference(output_dir: str) -> bool:
    """Whether a finished run in output_dir recorded the logits a resumed push is checked against."""
    from .pipeline.output import read_json, read_resume_record

    record = read_resume_record(output_dir) or {}
    legacy = (read_json(os.path.join(output_dir, "report.json")) or {}).get("reload_check") or {}
    return bool(record.get("reload_reference") or legacy.get("reference"))


def backend_weight_bits() -> Dict[str, Optional[List[int]]]:
    """Each registered backend's declared `weight_bits` (every bit width of integer-code weights its `supports` can
    accept; empty: it runs no integer-code scheme), or None where it declares none."""
    regs = registries()
    found = {}
    for name in regs.backends.names():
        bits = getattr(regs.backends.get(name), "weight_bits", None)
        try:
            if isinstance(bits, (str, bytes)):
                raise TypeError("a string")
            found[name] = None if bits is None else sorted({int(b) for b in bits})
        except (TypeError, ValueError):
            logging.getLogger("hfquant").warning(
                "backend %s: weight_bits=%r is not a list of bit widths (e.g. (4, 8)); ignored", name, bits)
            found[name] = None
    return found


def refuse_unrunnable_bits(cfg: DictConfig, widths: Dict[str, Optional[List[int]]]) -> None:
    """Refuse an integer-code scheme's weight bit width that no backend in question declares it runs (`weight_bits`,
    docs/plugins.md). The command line's first check passes the widths saved with the config nodes, before any plugin
    or torch loads; `validate` passes the live ones first of all, so a job whose first problem is its bit width gets
    the same line either way. Silent for other scheme formats (their backends' `supports` explain), where a backend
    declares no widths, for a value `QuantArgs` itself refuses (its own message follows), and for a backend that is
    not registered."""
    try:
        bits = OmegaConf.select(cfg, "scheme.weights.num_bits", default=None)
        backend = str(OmegaConf.select(cfg, "backend.name", default="auto"))
        scheme_format = OmegaConf.select(cfg, "scheme.format", default="int")
    except Exception:  # an interpolation that does not resolve: validate() names it
        return
    if scheme_format != "int" or isinstance(bits, bool) or not isinstance(bits, int):
        return
    if not MIN_BITS <= bits <= MAX_BITS:
        return
    asked = widths if backend == "auto" else {backend: widths[backend]} if backend in widths else {}
    if not asked or any(w is None or bits in w for w in asked.values()):
        return
    if backend != "auto" and not asked[backend]:
        return  # it runs no integer-code scheme at all: the width is not the problem, its `supports` says what is

    def listed(w: List[int]) -> str:
        return ", ".join(map(str, w)) or "none"

    what = f"{bits}-bit weights (scheme.weights.num_bits={bits})"
    if backend == "auto":
        each = "; ".join(f"{n} {listed(w)}" for n, w in asked.items())
        raise ConfigError(f"no backend can run {what}; the integer-code weight widths each runs: {each}")
    others = [n for n, w in widths.items() if n != backend and (w is None or bits in w)]
    raise ConfigError(f"backend={backend} cannot run {what}; the integer-code weight widths it runs: "
                      f"{listed(asked[backend])}. "
                      + (f"Backends that may: {', '.join(others)}" if others else "No backend can: change the scheme"))


def scheme_changes(scheme: QuantScheme) -> List[str]:
    """`scheme.weights.num_bits=3`-style settings in which `scheme` differs from the registered preset of its name
    (observers aside); empty for an unregistered name."""
    try:
        preset = registries().schemes.get(scheme.name)
    except UnknownNameError:
        return []
    changes = []
    for part in ("weights", "input_activations"):
        mine, theirs = getattr(scheme, part), getattr(preset, part)
        if mine is None or theirs is None:
            if (mine is None) != (theirs is None):
                changes.append(f"scheme.{part}={'null' if mine is None else 'set'}")
            continue
        changes += [f"scheme.{part}.{f.name}={getattr(mine, f.name)}" for f in dataclasses.fields(mine)
                    if f.name != "observer" and getattr(mine, f.name) != getattr(theirs, f.name)]
    return changes


def scheme_label(scheme: QuantScheme) -> str:
    """`'w4a16'`, or `'w4a16' with scheme.weights.num_bits=3` when the command line changed the preset: the name alone
    would describe a scheme the user is not running."""
    changes = scheme_changes(scheme)
    return f"{scheme.name!r}" + (f" with {', '.join(changes)}" if changes else "")


def validate(cfg: DictConfig) -> RunSpec:
    """Turn the composed config into a `RunSpec`, or raise `ConfigError` naming the bad key."""
    refuse_unrunnable_bits(cfg, backend_weight_bits())  # first, as the command line's torch-free check runs it
    _require_set(cfg)
    scheme = _scheme(cfg)
    observer = cfg.observer.name
    _known("observers", observer, "observer")
    options = _plain(cfg.observer.get("options")) or {}
    obs_cls = registries().observers.get(observer)
    _check_options(obs_cls, options, "observer.options")
    try:
        obs_cls(scheme.weights or scheme.input_activations, **options)  # option values validated by the observer
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"observer.options: {exc}") from None
    scheme = scheme.with_observer(observer)

    backend = cfg.backend.name
    device = str(cfg.get("device", "cpu"))
    if backend != "auto":
        _known("backends", backend, "backend")
        reason = backend_problem(backend, scheme, device)
        if reason:
            able = [n for n in registries().backends.names() if not backend_problem(n, scheme, device)]
            way_out = f"Backends that can: {', '.join(able)}" if able else "No backend can: change the scheme"
            raise ConfigError(f"backend={backend} cannot run scheme {scheme_label(scheme)} on {device}: {reason}. {way_out}")
    elif not any(backend_problem(n, scheme, device) is None for n in registries().backends.names()):
        reasons = "; ".join(f"{n}: {backend_problem(n, scheme, device)}" for n in registries().backends.names())
        raise ConfigError(f"no backend can run scheme {scheme_label(scheme)} on {device} ({reasons})")

    model = _plain(cfg.model)
    if model.get("task", "causal-lm") not in ("causal-lm", "embedding"):
        raise ConfigError(f"model.task={model.get('task')!r}; allowed: causal-lm, embedding")
    if model.get("dtype", "float32") not in ("float32", "float16", "bfloat16", "auto"):
        raise ConfigError(f"model.dtype={model.get('dtype')!r}; allowed: float32, float16, bfloat16, auto")
    if model.get("max_memory") is not None:
        if not isinstance(model["max_memory"], dict):
            raise ConfigError(f"model.max_memory must map devices to sizes, e.g. model.max_memory={{0:20GiB,cpu:60GiB}}; "
                              f"got {model['max_memory']!r}")
        if model.get("device_map") is None:
            raise ConfigError("model.max_memory only applies with model.device_map (e.g. model.device_map=auto)")
    if not model.get("path"):
        raise ConfigError("model.path is empty; give a Hub id or a local folder, e.g. model.path=/models/foo")

    calibration = _data(cfg.calibration, "calibration", need_samples=True)
    if scheme.needs_calibration_data and calibration is None:
        raise ConfigError(f"scheme {scheme.name!r} calibrates static activations: set calibration=pydoc (or another dataset), not none")
    fmt = _format(cfg, scheme, backend, device)
    algorithms, propagate, algorithm_reason = _algorithms(cfg, scheme, backend, calibration is not None)
    needs_data = [n for n in algorithms if getattr(registries().algorithms.get(n), "requires_data", False)]
    if needs_data and calibration is None:
        raise ConfigError(f"algorithm {needs_data[0]} learns from layer inputs and needs calibration data: set "
                          "calibration=mix (or another dataset), not none — or use a data-free algorithm (rtn, hqq)")
    evaluation = _data(cfg.evaluation, "evaluation", need_samples=False)
    if evaluation is not None and not evaluation.evaluators:
        raise ConfigError("evaluation.evaluators is empty; e.g. evaluation.evaluators=[perplexity]")
    hub = _plain(cfg.get("hub")) or {}
    pipeline = str(cfg.get("pipeline", "auto"))
    if pipeline not in PIPELINES:
        raise ConfigError(f"pipeline={pipeline!r}; allowed: {', '.join(PIPELINES)}")
    max_shard_size = cfg.get("max_shard_size", "5GB")
    try:
        from huggingface_hub.serialization._base import parse_size_to_int

        size = max_shard_size if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) \
            else parse_size_to_int(str(max_shard_size))
        if size <= 0:
            raise ValueError("must be positive")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"max_shard_size={max_shard_size!r} is not a size ({exc}); e.g. max_shard_size=5GB") from None
    output_dir = cfg.get("output_dir")
    if not output_dir:
        raise ConfigError("output_dir is empty")
    _check_hub(hub, evaluation, bool(cfg.get("resume", False)), str(output_dir))
    return RunSpec(model, scheme, observer, options, backend, calibration, evaluation, str(output_dir),
                   bool(cfg.get("overwrite", False)), bool(cfg.get("resume", False)), device, hub, pipeline, max_shard_size,
                   algorithms=algorithms, propagate=propagate, format=fmt, algorithm_reason=algorithm_reason,
                   format_options=_format_options(cfg, fmt, scheme))


def _format(cfg: DictConfig, scheme: QuantScheme, backend: str, device: str) -> str:
    """`format=auto` keeps the backend's own; a named format must store the scheme and be run by the backend."""
    fmt = str((_plain(cfg.get("format")) or {}).get("name", "auto"))
    if fmt == "auto":
        return fmt
    _known("formats", fmt, "format")
    problem = registries().formats.get(fmt).problem(scheme)
    if problem:
        raise ConfigError(f"format={fmt} cannot store scheme {scheme.name!r}: {problem}")
    if bool(cfg.get("resume", False)) and written_from(fmt) != fmt:
        raise ConfigError(f"resume=true reuses hfquant-format folders; format={fmt} converts the folder at the end of a "
                          "run, so run again without resume=true (overwrite=true)")
    runs = {n: getattr(registries().backends.get(n), "format", "hfquant") for n in registries().backends.names()}
    fmt_runs = fmt
    fmt = written_from(fmt)  # an export format is fed by the backends of its source format
    if backend != "auto" and runs[backend] != fmt:
        able = [n for n, f in runs.items() if f == fmt]
        raise ConfigError(f"backend={backend} runs the {runs[backend]} format, not {fmt}; use backend="
                          f"{' or '.join(able) or 'auto'} (or format=auto)")
    if backend == "auto" and not any(f == fmt and backend_problem(n, scheme, device) is None
                                     for n, f in runs.items()):
        raise ConfigError(f"no backend runs format={fmt_runs} with scheme {scheme.name!r} on {device}")
    return fmt_runs


def _format_options(cfg: DictConfig, fmt: str, scheme: QuantScheme) -> dict:
    """`format.<option>=` values, checked by constructing the format (its constructor validates them)."""
    raw = {k: v for k, v in ((_plain(cfg.get("format")) or {})).items() if k != "name"}
    if fmt == "auto":
        return {}
    try:
        registries().formats.get(fmt)(scheme, **raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"format.{fmt}: {exc}") from None
    return raw


def written_from(fmt: str) -> str:
    """The format a backend must run for `fmt`: itself, or an export format's `source_format`."""
    if fmt == "auto" or fmt not in registries().formats.names():
        return fmt
    return getattr(registries().formats.get(fmt), "source_format", fmt)


def _algorithms(cfg: DictConfig, scheme: QuantScheme, backend: str, has_data: bool):
    """`algorithm=[awq,gptq]` → {"awq": {...}, "gptq": {...}} in order, each name registered and its options
    accepted; at most one code producer, and it comes last (weight edits must precede the codes).
    `algorithm=auto` → what `hfquant.auto_algorithm.choose` picks for this scheme, backend and data, and why."""
    raw = _plain(cfg.get("algorithm")) or {"rtn": {}}
    if not isinstance(raw, dict):
        raise ConfigError(f"algorithm must be chosen as a group option, e.g. algorithm=gptq or algorithm=[awq,gptq]; got {raw!r}")
    reason = ""
    if AUTO in raw:
        if len(raw) > 1:
            raise ConfigError(f"algorithm=auto chooses the whole recipe; it cannot be combined with "
                              f"{', '.join(n for n in raw if n != AUTO)} — name the algorithms instead, e.g. algorithm=[awq,gptq]")
        if raw[AUTO]:
            raise ConfigError(f"algorithm=auto takes no options (got {sorted(raw[AUTO])}); to set an algorithm's options, "
                              "name the algorithms, e.g. algorithm=[awq,gptq] algorithm.gptq.dampening=0.05")
        fmt = "" if backend == "auto" else getattr(registries().backends.get(backend), "format", "hfquant")
        raw, reason = choose_algorithms(scheme, fmt, has_data)
    algorithms = {}
    for name, options in raw.items():
        _known("algorithms", name, "algorithm")
        options = dict(options or {})
        cls = registries().algorithms.get(name)
        _check_options(cls, options, f"algorithm.{name}")
        try:
            instance = cls(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"algorithm.{name}: {exc}") from None
        problem = getattr(instance, "problem", None)
        message = problem(scheme) if callable(problem) else None
        if message:
            raise ConfigError(f"algorithm.{name}: {message}")
        algorithms[name] = options
    producers = [n for n in algorithms if getattr(registries().algorithms.get(n), "produces_codes", False)]
    if len(producers) > 1:
        raise ConfigError(f"algorithm: {' and '.join(producers)} both choose the integer codes; keep one (weight-editing "
                          "algorithms such as awq or smoothquant may come before it, e.g. algorithm=[awq,gptq])")
    if producers and producers[0] != list(algorithms)[-1]:
        raise ConfigError(f"algorithm: {producers[0]} chooses the codes, so it must come last (e.g. "
                          f"algorithm=[{','.join([n for n in algorithms if n != producers[0]] + producers)}])")
    editors = [n for n in algorithms if n not in producers]
    if editors and scheme.input_activations is not None and not scheme.input_activations.dynamic:
        raise ConfigError(f"algorithm {editors[0]} edits weights after static activation scales are observed; use a "
                          "dynamic-activation scheme (e.g. scheme=w8a8) or drop it")
    if backend != "auto" and set(algorithms) != {"rtn"}:
        fmt = getattr(registries().backends.get(backend), "format", "hfquant")
        if fmt != "hfquant":
            raise ConfigError(f"backend={backend} computes its own codes ({fmt} format), so algorithm="
                              f"{','.join(algorithms)} cannot apply; use backend=cpu (or fake), or algorithm=rtn")
    propagate = str(cfg.get("propagate", "quantized"))
    if propagate not in ("quantized", "float"):
        raise ConfigError(f"propagate={propagate!r}; allowed: quantized (each layer sees the previous layers' "
                          "quantized outputs, as at inference), float")
    return algorithms, propagate, reason
