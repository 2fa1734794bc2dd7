"""The Hydra entry point. Scheme, observer and backend options are generated from the plugin registries
(`config_nodes.py`), so a plugin's names work on the command line (`observer=sigma`) with no YAML."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from .config_nodes import installation_key, register_config_nodes, register_saved_config_nodes
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, HfquantError

log = logging.getLogger("hfquant")


@hydra.main(version_base="1.3", config_path="pkg://hfquant.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from .pipeline.run import run  # registers hfquant's format with transformers (pipeline/save.py imports it)
    from .sweep import recorded_failure

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
    """Exit without the interpreter's teardown of torch (~0.6 s of a 2-core machine's 2 s before anything ran: help,
    a refused command line; ~2 s with transformers after a run, through `finish`): only the standard streams, C
    stdio and logging have anything to flush."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # as sys.exit: anything else is printed, and the status is 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe (`hfquant ... | head`): nothing more can reach it
            pass
    logging.shutdown()
    try:  # what C extensions printed through stdio, which os._exit would not flush
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass
    os._exit(code)


def hydra_main() -> None:
    from .help import print_help, wants_help
    from .precheck import check_command_line

    take_verbose_flag()
    try:
        with reported_errors():
            key = installation_key()  # before any plugin loads
            if wants_help(sys.argv[1:]):  # from the nodes an earlier invocation saved: no plugins, no torch
                if not register_saved_config_nodes(key=key):
                    register_config_nodes(save=True, key=key)
                print_help(sys.argv[1:])
                sys.exit(0)
            if register_saved_config_nodes(key=key):  # a typo in an option or key is refused before plugins load
                check_command_line(sys.argv[1:], compose_only=True)
            register_config_nodes(save=True, key=key)
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
        finish(exc.code)
    try:
        with reported_errors():
            from .sweep import raise_if_jobs_failed

            raise_if_jobs_failed()  # after a sweep: exit 2 if any job failed (the others were summarised)
    except SystemExit as exc:
        finish(exc.code)
    finish(0)


def finish(code) -> "NoReturn":
    """Exit after the run without the interpreter's teardown of torch and transformers: finalising their modules
    and a last garbage collection over millions of objects take ~2 s of a 2-core machine and do nothing for a run
    whose files are written and closed. Exit handlers still run (logging's flush among them); a thread still
    working (none should be) gets the normal exit, which waits for it."""
    import atexit
    import threading

    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before the teardown skipped here
    exit_now(code)


def _remove_if_only_hydra_files(output_dir: str) -> None:
    """A run that failed before writing anything leaves no folder behind (retries would pile up `.hydra/<time>/`
    folders in it): removed only when this run created it and it holds nothing but Hydra's files."""
    import shutil

    if os.path.isdir(output_dir) and set(os.listdir(output_dir)) <= {".hydra"}:
        shutil.rmtree(output_dir, ignore_errors=True)
