"""The Hydra entry point. Scheme, observer and backend options are generated from the plugin registries, so
a plugin's names work on the command line (`observer=sigma`) with no YAML; `register_configs` adds more."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from contextlib import contextmanager
from typing import NoReturn

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from .auto_algorithm import AUTO
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, HfquantError
from .plugins import get_plugin_manager, registries
from .registry import PluginError

log = logging.getLogger("hfquant")


def constructor_defaults(cls) -> dict:
    """The constructor's keyword defaults (after `self` and an observer's `args`): what a plugin's options in the
    config start from."""
    sig = inspect.signature(cls.__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.name not in ("self", "args")
            and p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def register_config_nodes(cs: ConfigStore | None = None) -> None:
    """Store a node for every registered scheme, observer, algorithm and backend, then call `register_configs`."""
    cs = cs or ConfigStore.instance()
    regs = registries()
    for name in regs.schemes.names():
        d = regs.schemes.get(name).to_dict()
        d.setdefault("embedding", None)  # settable on the command line: scheme.embedding=int8
        cs.store(group="scheme", name=name, node=d)
    for name in regs.observers.names():
        cs.store(group="observer", name=name, node={"name": name, "options": constructor_defaults(regs.observers.get(name))})
    for name in regs.algorithms.names():
        cs.store(group="algorithm", name=name, node={name: constructor_defaults(regs.algorithms.get(name))})
    if AUTO in regs.algorithms.names():
        raise PluginError(f"algorithm name {AUTO!r} is reserved (algorithm=auto picks a recipe); rename the plugin's "
                          f"algorithm registered by {regs.algorithms.entry(AUTO).plugin}")
    cs.store(group="algorithm", name=AUTO, node={AUTO: {}})  # the recipe chosen for the scheme (auto_algorithm.py)
    for name in regs.formats.names():
        cs.store(group="format", name=name, node={"name": name, **constructor_defaults(regs.formats.get(name))})
    cs.store(group="format", name="auto", node={"name": "auto"})
    for name in regs.backends.names() + ["auto"]:
        cs.store(group="backend", name=name, node={"name": name})
    get_plugin_manager().hook.register_configs(config_store=cs)


@hydra.main(version_base="1.3", config_path="pkg://hfquant.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from .formats import register_with_transformers
    from .pipeline.run import run
    from .sweep import recorded_failure

    register_with_transformers()
    with reported_errors(), recorded_failure():  # in a sweep, a failed job is recorded and the next one runs
        run(cfg)


VERBOSE_FLAG = "--verbose"


def verbose() -> bool:
    """Tracebacks wanted (bug reports): `hfquant --verbose ...` or Hydra's own HYDRA_FULL_ERROR=1."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("HFQUANT_VERBOSE") == "1"


def fail(message: str, code: int = EXIT_ERROR) -> "NoReturn":
    """One line on stderr; anything token-shaped in it (an echoed value) is redacted."""
    from .redact import redact_text

    print(f"hfquant: error: {redact_text(message)}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def reported_errors():
    """Every failure ends as one `hfquant: error:` line and exit 2 (130 for Ctrl-C); `--verbose` re-raises."""
    try:
        yield
    except HfquantError as exc:
        if verbose():
            raise
        fail(str(exc))
    except KeyboardInterrupt as exc:
        if verbose():
            raise
        fail(str(exc) or "interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line, with the way to get the traceback
        if verbose():
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (this is probably a bug in hfquant or a plugin; re-run with "
             f"{VERBOSE_FLAG} for the traceback and report it)")


def take_verbose_flag() -> None:
    """`--verbose` anywhere on the command line: tracebacks for bug reports (Hydra never sees the flag)."""
    if VERBOSE_FLAG in sys.argv[1:]:
        sys.argv.remove(VERBOSE_FLAG)
        os.environ["HFQUANT_VERBOSE"] = "1"


def exit_now(code) -> "NoReturn":
    """Exit before anything ran (help, a refused command line) without the interpreter's teardown of torch
    (~0.6 s of a 2-core machine's 2 s): only the standard streams and logging have anything to flush."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code or 0)


def hydra_main() -> None:
    from .help import print_help, wants_help
    from .precheck import check_command_line

    take_verbose_flag()
    try:
        with reported_errors():
            register_config_nodes()
            if wants_help(sys.argv[1:]):
                print_help(sys.argv[1:])
                sys.exit(0)
            # every job composed and validated before the first runs; Hydra's own files go under output_dir
            placement, output_dir = check_command_line(sys.argv[1:])
            sys.argv.extend(placement)
    except SystemExit as exc:
        exit_now(exc.code)
    new_output_dir = output_dir if output_dir and not os.path.exists(output_dir) else None  # this run creates it
    try:
        _main()
    except SystemExit as exc:
        if exc.code not in (None, 0) and new_output_dir:
            _remove_if_only_hydra_files(new_output_dir)
        raise
    with reported_errors():
        from .sweep import raise_if_jobs_failed

        raise_if_jobs_failed()  # after a sweep: exit 2 if any job failed (the others were summarised)


def _remove_if_only_hydra_files(output_dir: str) -> None:
    """A run that failed before writing anything leaves no folder behind (retries would pile up `.hydra/<time>/`
    folders in it): removed only when this run created it and it holds nothing but Hydra's files."""
    import shutil

    if os.path.isdir(output_dir) and set(os.listdir(output_dir)) <= {".hydra"}:
        shutil.rmtree(output_dir, ignore_errors=True)
