"""Where hfquant keeps what it computed once (baselines, converted GGUF models, the config nodes `--help` reads):
`$HFQUANT_CACHE`, else `$XDG_CACHE_HOME/hfquant`, else `~/.cache/hfquant`. Deleting it only costs time."""

from __future__ import annotations

import os


def cache_root() -> str:
    return os.environ.get("HFQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hfquant")
