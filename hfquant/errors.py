"""The one base class of every error a user can cause or fix (bad config, bad input file, folder in use...).

`hfquant` prints these as one `hfquant: error: <message>` line and exits 2; anything else is a bug and is
reported the same way plus a hint to re-run with `--verbose` (or `HYDRA_FULL_ERROR=1`) for the traceback.
Subclasses keep their builtin bases (ValueError, FileExistsError...) so existing `except` clauses still work.
"""

from __future__ import annotations


class HfquantError(Exception):
    """A problem with the user's input or environment; the message names it, the file or key, and the way out."""


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def first_few(items, limit: int = 5, sep: str = "; ") -> str:
    """A readable list for an error message: the first `limit` items, then how many more."""
    items = list(items)
    more = f"{sep}and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more
