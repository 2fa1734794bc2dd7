"""Check a whole command line before Hydra runs anything: every job of a sweep is composed and validated, so a
bad value in job 3 fails before job 1 has loaded a model, and Hydra's composition errors become one line.

The command line is read with Hydra's own argument parser and override grammar, a sweep is expanded the way
Hydra's BasicSweeper expands it (`a,b`, `choice(...)`, `range(...)`, `glob(...)`), and each job is composed
with Hydra's config loader exactly as the launcher will compose it. Nothing is written and no model is loaded.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .config import ConfigError, refuse_unrunnable_bits, validate
from .config_nodes import saved_weight_bits
from .redact import is_secret_key

# `+key=value` may only add options that a plugin accepts (validate() checks them against the plugin) or Hydra's own.
PLUGIN_NAMESPACES = ("observer.options.", "scheme.options.", "calibration.", "evaluation.", "hydra.")
# Flags after which Hydra prints something instead of running: nothing to check.
NON_RUN_FLAGS = ("help", "hydra_help", "info", "shell_completion", "experimental_rerun", "cfg")
# Config groups filled from the plugin registries: their own error names the registered plugins.
REGISTRY_GROUPS = {"observer": "observers", "scheme": "schemes", "backend": "backends"}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
ADD_HELP = ("'+' adds only plugin options (observer.options.<name>, scheme.options.<name>, calibration.<option>, "
            "evaluation.<option>) and hydra.<key>")


def check_command_line(argv: List[str], compose_only: bool = False) -> Tuple[List[str], Optional[str]]:
    """Refuse a bad `hfquant <argv>` now; return the overrides to append so Hydra's own files (.hydra/, the log)
    go under the run's output_dir instead of ./outputs/<date>/<time>/, and that output_dir (absolute) when they do.
    `compose_only`: only what composing the jobs finds (unknown options and keys, bad syntax) and a weight bit width
    no backend declares (the widths saved with the config nodes), which needs no plugin loaded; the full check
    (values, data files, output folders) needs them."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    check_secrets(args.overrides)
    if any(getattr(args, flag, None) for flag in NON_RUN_FLAGS) or args.config_path or args.config_dir:
        return [], None  # help / --cfg / another config tree: Hydra's business
    extra, dirs = _checked_jobs(list(args.overrides), args.config_name or "config", bool(args.multirun), compose_only)
    return extra, (dirs[0][1] if extra and dirs else None)


def check_jobs(overrides: List[str], config_name: str = "config", multirun: bool = False) -> List[str]:
    """Compose and validate every job; returns the Hydra file placement overrides (single runs only)."""
    return _checked_jobs(overrides, config_name, multirun)[0]


def check_secrets(overrides: List[str]) -> None:
    """A secret-looking key (`+hub.auth=`, `hub.token=`, `hydra.job.env_set.HF_TOKEN=`) is refused without
    echoing its value: Hydra would save it in .hydra/ and hfquant in the report and model card."""
    for raw in overrides:
        key = raw.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        parts = key.replace("/", ".").split(".")
        if any(is_secret_key(p) and not p.lower().startswith("tokenizer") for p in parts):
            raise ConfigError(f"{key}: never pass a token or other secret on the command line (Hydra saves overrides "
                              "with the run); set HF_TOKEN or run `hf auth login`")


def _checked_jobs(overrides: List[str], config_name: str, multirun: bool, compose_only: bool = False):
    """(placement overrides, [(job label, its absolute output_dir)]) once every job is composed and validated
    (composed only: no folders)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's resolvers (now, hydra) as the real run has them
    with initialize_config_module(config_module="hfquant.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        check_bare_words(loader, overrides)
        parsed = _parse(parser, overrides)
        multirun = multirun or any(o.key_or_group == "hydra.mode" and str(o.value()) == "MULTIRUN" for o in parsed)
        _check_additions(loader, config_name, parsed)
        extra = [] if multirun else hydra_file_overrides(parsed)
        try:
            dirs = [(label, _composed(cfg, label) if compose_only else _validated(cfg, label)) for label, cfg in
                    _jobs(loader, parser, config_name, overrides + extra, parsed, multirun)]
            if compose_only:
                return extra, []
        finally:
            HydraConfig.instance().cfg = None  # the real run sets its own
    _check_output_dirs(dirs)
    return extra, dirs


def hydra_file_overrides(parsed) -> List[str]:
    """With output_dir given, Hydra's run folder is output_dir itself; each run's `.hydra/` files and log go in
    their own `.hydra/<timestamp>/`, so a refused run never overwrites those of the run the folder holds."""
    given = {o.key_or_group: o for o in parsed}
    out = given.get("output_dir")
    if out is None or out.is_delete() or re.search(r"\$\{\s*hydra[:.]", out.get_value_element_as_str()):
        return []  # no output_dir, or one made from Hydra's own folders
    if any(k in given for k in ("hydra.run.dir", "hydra.output_subdir")):
        return []  # the user placed Hydra's files themselves
    extra = ["hydra.run.dir=${output_dir}", "hydra.output_subdir=.hydra/${now:%Y-%m-%d_%H-%M-%S}"]
    if not any(k.startswith(("hydra/job_logging", "hydra.job_logging")) for k in given):
        # opened at the first record (delay): Hydra sets up logging before it creates the .hydra/ folder
        extra += ["hydra.job_logging.handlers.file.filename="
                  "${hydra.runtime.output_dir}/${hydra.output_subdir}/${hydra.job.name}.log",
                  "++hydra.job_logging.handlers.file.delay=true"]
    return extra


def check_bare_words(loader, overrides: List[str]) -> None:
    """A word without `=` (`hfquant scheme --help`) would be Hydra's "missing EQUAL" parse error: say what to write
    instead — for a config group, its options and how to see one's settings. (`~key` deletes and has no `=`.)"""
    for word in overrides:
        if "=" in word or word.startswith("~"):
            continue
        group = word.lstrip("+")
        options = sorted(loader.get_group_options(group)) if group and _is_group(loader, group) else []
        if options:
            raise ConfigError(f"{word!r} needs an option: {group}=<option>, one of {', '.join(options)} "
                              f"(`hfquant {group}=<option> --help` shows that option's settings)")
        raise ConfigError(f"{word!r} is not an override: write key=value (e.g. output_dir=out/run); `hfquant --help` "
                          "lists every config group and key")


def _parse(parser, overrides: List[str]):
    from hydra.errors import OverrideParseException

    try:
        return parser.parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot read the override {exc.override!r}: {_one_line(exc.message)}") from None


def _check_additions(loader, config_name: str, parsed) -> None:
    """`+outptu_dir=x` would be accepted silently (and saved with the run): `+` may only add plugin options."""
    for o in parsed:
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add()) or key.startswith(PLUGIN_NAMESPACES) or _is_group(loader, key):
            continue
        if o.is_force_add() and _has_key(_base_tree(loader, config_name, parsed), key):
            continue  # `++key=` on a key that exists is a plain change
        raise ConfigError(f"{_unknown_key(loader, config_name, parsed, key)} ({ADD_HELP})")


def _is_group(loader, key: str) -> bool:
    return "/" in key or loader.repository.group_exists(key)


def _jobs(loader, parser, config_name: str, overrides: List[str], parsed, multirun: bool):
    """(label, full config) of each job, composed as Hydra's launcher composes it."""
    from hydra.types import RunMode

    if not multirun:
        with _composition_errors(loader, config_name, parsed, None):
            cfg = loader.load_configuration(config_name, overrides, RunMode.RUN, from_shell=True)
        yield None, cfg
        return
    with _composition_errors(loader, config_name, parsed, None):
        master = loader.load_configuration(config_name, overrides, RunMode.MULTIRUN, from_shell=True)
    jobs = _sweep(parser, master)
    swept = _swept_keys(jobs)
    for num, job in enumerate(jobs):
        label = f"sweep job #{num}" + (f" ({' '.join(o for o in job if o.split('=', 1)[0] in swept)})" if swept else "")
        with _composition_errors(loader, config_name, parsed, label):
            cfg = loader.load_sweep_config(master, list(job))
            with open_dict(cfg):
                cfg.hydra.job.id, cfg.hydra.job.num = num, num
        yield label, cfg


def _sweep(parser, master: DictConfig) -> List[List[str]]:
    """The jobs' overrides, as BasicSweeper lists them (one job, the master's overrides, for other sweepers)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    task = list(OmegaConf.to_container(master.hydra.overrides.task, resolve=False))
    if master.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return [task]
    params = master.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + task
    try:
        return BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)[0]
    except Exception as exc:  # an interval sweep, which BasicSweeper cannot run either
        raise ConfigError(_one_line(str(exc))) from None


def _swept_keys(jobs: List[List[str]]) -> set:
    """The keys whose value differs between jobs: what names a job in a message."""
    values = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}


class _composition_errors:
    """Hydra's composition errors as one ConfigError line (with the closest match), labelled with the job."""

    def __init__(self, loader, config_name: str, parsed, label: Optional[str]) -> None:
        self.args, self.label = (loader, config_name, parsed), label

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if exc is None or not isinstance(exc, (HydraException, OmegaConfBaseException)):
            return False
        message = _explain(exc, *self.args)
        raise job_error(self.label, message) from None


def _explain(exc, loader, config_name: str, parsed) -> str:
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, MissingConfigException) and "/" in (exc.missing_cfg_file or ""):
        group, name = exc.missing_cfg_file.rsplit("/", 1)
        return _unknown_option(loader, group, name, exc.options)
    text = str(exc)
    if isinstance(exc, ConfigCompositionException) and text.startswith("Could not override '") \
            and isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        key = text.split("'", 2)[1]
        return _unknown_key(loader, config_name, parsed, key)
    return _one_line(text.split("\nConfig search path:", 1)[0])


def _unknown_option(loader, group: str, name: str, options) -> str:
    if group in REGISTRY_GROUPS:  # its options are the registered names (and `auto`): no plugin needs loading
        from .registry import unknown_name_message

        registered = [o for o in loader.get_group_options(group) if o != "auto"]
        return f"{group}: {unknown_name_message(REGISTRY_GROUPS[group][:-1], name, registered)}"
    options = sorted(options or loader.get_group_options(group))
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{group}={name}: no such option in config group '{group}'; available: {', '.join(options)}.{hint}"


def _unknown_key(loader, config_name: str, parsed, key: str) -> str:
    """`unknown key 'outptu_dir'; did you mean 'output_dir'?` — the closest key at the level where it goes wrong."""
    node, parts = _base_tree(loader, config_name, parsed), key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        where = ".".join(parts[:i])
        keys = sorted(k for k in node if i or k != "hydra") if isinstance(node, dict) else []
        close = difflib.get_close_matches(part, keys, n=1)
        prefix = f"{where}." if where else ""
        if close:
            return f"unknown key '{key}'; did you mean '{prefix}{close[0]}'?"
        if not isinstance(node, dict):
            return f"unknown key '{key}': {where} is a value, not a group of settings"
        known = f"unknown key '{key}'; {where or 'the top level'} has: {', '.join(keys) or 'nothing'}"
        if key.startswith(PLUGIN_NAMESPACES[:-1]):  # a plugin option the defaults do not list
            return f"{known}; to pass an option the plugin accepts, write +{key}=<value>"
        return known
    return f"key '{key}' cannot be set this way"


def _base_tree(loader, config_name: str, parsed) -> dict:
    """The config the command line's group choices give (unresolved), to look keys up in."""
    from hydra.types import RunMode

    groups = [o.input_line for o in parsed if _is_group(loader, o.key_or_group) and not o.is_sweep_override()
              and not o.is_delete()]
    for choice in (groups, []):
        try:
            cfg = loader.load_configuration(config_name, choice, RunMode.RUN)
            return OmegaConf.to_container(cfg, resolve=False)
        except Exception:  # a bad group choice is reported by the composition itself
            continue
    return {}


def _has_key(tree: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def job_error(label: Optional[str], message: str) -> ConfigError:
    """A refused job's line: a sweep's names the job, and that none ran."""
    return ConfigError(f"{label}: {message} (no job was run)" if label else message)


def _composed(cfg: DictConfig, label: Optional[str]) -> None:
    """What the saved config nodes can judge of a composed job without any plugin: a weight bit width no backend
    declares it runs (the message `validate` gives with the plugins loaded)."""
    try:
        refuse_unrunnable_bits(cfg, saved_weight_bits())
    except ConfigError as exc:
        raise job_error(label, str(exc)) from None


def _validated(cfg: DictConfig, label: Optional[str]) -> str:
    """hfquant's own validation of one job, with Hydra's runtime values set as its launcher sets them."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    from .pipeline.data import DataError, check_sources  # torch: not for `--help`

    try:
        folder = str(OmegaConf.select(cfg, "hydra.sweep.dir" if label else "hydra.run.dir"))
        if label:
            folder = os.path.join(folder, str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = os.path.abspath(folder)
        HydraConfig.instance().set_config(cfg)
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        spec = validate(task)
        check_sources(spec)  # data files exist and are text: cheap, and before Hydra creates any folder
        return os.path.abspath(spec.output_dir)
    except (ConfigError, DataError, OmegaConfBaseException) as exc:
        message = str(exc) if isinstance(exc, (ConfigError, DataError)) else _one_line(str(exc))
        raise job_error(label, message) from None


def _check_output_dirs(dirs: List[Tuple[Optional[str], str]]) -> None:
    """Jobs of one sweep writing the same folder would refuse each other after the first finished; a folder that
    is a file or not writable would fail inside Hydra (which writes .hydra/ there first)."""
    from .pipeline.output import OutputFolderError

    seen = {}
    for label, folder in dirs:
        if folder in seen:
            raise ConfigError(f"{seen[folder]} and {label} would both write output_dir {folder!r}; leave output_dir "
                              "out of a sweep (each job gets its own run-N folder) or make it differ per job")
        seen[folder] = label
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            what = f"output_dir {folder!r}" + ("" if existing == folder else f": {existing!r}")
            raise OutputFolderError(f"{what} is a file, not a folder; choose another output_dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputFolderError(f"output_dir {folder!r} cannot be created or written ({existing!r}: permission "
                                    "denied); choose a folder you can write to, or fix its permissions")


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())
