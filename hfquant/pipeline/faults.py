"""Fault injection for tests of interruption and crash safety: `HFQUANT_FAULT=<point>:<action>`.

Points are named places in a run: `stage:<name>` when a stage starts (`stage:load`, `stage:save`, ...),
and `save:written` once the model is fully written to its temporary folder, before it is renamed into place
(both pipelines). Actions: a signal name (`SIGKILL`,
`SIGINT`, `SIGTERM`) sent to this process, or an errno name (`ENOSPC`, `EIO`) raised as the OSError a failing
disk would raise. Unset, this is a
dictionary lookup per point: points are per stage or per file, never per tensor element.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "HFQUANT_FAULT"


def fault_point(name: str) -> None:
    """Act if `HFQUANT_FAULT` names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, action = spec.rpartition(":")
    if point != name:
        return
    if action.startswith("E"):
        code = getattr(errno, action)
        raise OSError(code, f"{os.strerror(code)} (injected at {name} by {ENV})")
    # raise_signal runs Python's handler before returning: the interrupt starts exactly at the named point
    signal.raise_signal(getattr(signal, action))
