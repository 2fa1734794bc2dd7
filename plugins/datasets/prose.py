"""`prose`: English fiction, offline — Mark Twain's *The Adventures of Tom Sawyer* (1876, public domain).

Quality measured only on the calibration domain hides over-fitting (GPTQ calibrated on Python docs wins on
Python docs and loses on prose), so a second, unrelated domain is needed that any machine can install
without the Hub. The novel ships as plain text (~95k SmolLM2 tokens) in the test data of Debian's
`golang-github-pierrec-lz4-dev` (no dependencies; `scripts/setup` installs it as root); `path=` points at any
other copy of the same Project Gutenberg text.

Units are the 35 chapters and the conclusion, in order; every fifth (index % 5 == 4: chapters V, X, XV, XX,
XXV, XXX, XXXV, ~19k tokens) is the evaluation part, the rest calibration, so the parts never share text.
Within a chapter, hard-wrapped lines are joined into paragraphs (blank line between paragraphs), as prose
is usually written; chapter headings and the transcriber's credits are left out.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
from typing import TYPE_CHECKING, List, Optional, Tuple

from hfquant import hookimpl
from hfquant.pipeline.data import DataError, MissingDataError

if TYPE_CHECKING:
    import datasets

PARTS = ("calibration", "evaluation")
DEB_PACKAGE = "golang-github-pierrec-lz4-dev"
DEFAULT_PATH = "/usr/share/gocode/src/github.com/pierrec/lz4/testdata/Mark.Twain-Tom.Sawyer.txt"
WORK, AUTHOR = "The Adventures of Tom Sawyer", "Mark Twain"
HEADING = re.compile(r"^(CHAPTER [IVXL]+|CONCLUSION)\s*$", re.MULTILINE)


def _paragraphs(body: str) -> str:
    """Hard-wrapped lines joined into paragraphs; paragraphs separated by one blank line."""
    blocks = re.split(r"\n\s*\n", body.strip())
    return "\n\n".join(" ".join(line.strip() for line in b.splitlines() if line.strip()) for b in blocks if b.strip())


@functools.lru_cache(maxsize=4)
def _chapters(path: str, size: int, mtime_ns: int) -> Tuple[Tuple[str, str], ...]:
    """(heading, text) for every chapter of the file (cached per size and mtime: the run reads it twice)."""
    with open(path, encoding="utf-8") as f:
        raw = f.read().replace("\r\n", "\n")
    marks = list(HEADING.finditer(raw))
    ends = [m.start() for m in marks[1:]] + [len(raw)]
    return tuple((m.group(1), _paragraphs(raw[m.end():end])) for m, end in zip(marks, ends))


def _deb_version() -> Optional[str]:
    """The installed Debian package's version (None off Debian or when it is not installed)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEB_PACKAGE], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip() if out.returncode == 0 else ""
    return version or None


class ProseText:
    """*The Adventures of Tom Sawyer* as a 🤗 `datasets.Dataset` with one chapter per row."""

    def __init__(self, path: str = DEFAULT_PATH, column: str = "text") -> None:
        self.path, self.column = str(path), column
        if not os.path.isfile(self.path):
            how = (f"install the Debian package that ships it: apt-get install {DEB_PACKAGE} (scripts/setup does "
                   "this when run as root)" if self.path == DEFAULT_PATH else "check the path")
            raise MissingDataError(f"path: the text of {WORK!r} is not at {self.path!r}; {how}, or point path= at a "
                                   "copy of the Project Gutenberg plain text", "path")

    def chapters(self) -> List[Tuple[str, str]]:
        st = os.stat(self.path)
        found = list(_chapters(os.path.realpath(self.path), st.st_size, st.st_mtime_ns))
        if len(found) < 10:
            raise DataError(f"path: {self.path!r} has {len(found)} chapter heading(s) ('CHAPTER I' ... 'CONCLUSION' "
                            f"alone on a line); it is not the Project Gutenberg text of {WORK!r}", "path")
        return found

    def load(self, part: str) -> datasets.Dataset:
        import datasets  # here, not at the top: importing it takes a second that runs without data should not pay

        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        wanted = [c for i, c in enumerate(self.chapters()) if (i % 5 == 4) == (part == "evaluation")]
        return datasets.Dataset.from_dict({"chapter": [h for h, _ in wanted], self.column: [t for _, t in wanted]})

    def texts(self, part: str) -> list:
        return list(self.load(part)[self.column])

    def where(self, part: str) -> str:
        """What a too-short error names."""
        which = "every fifth chapter" if part == "evaluation" else "four chapters in five"
        return f"the {part} part of {WORK!r} at {self.path!r} ({which})"

    def describe(self) -> dict:
        with open(self.path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        shipped = os.path.realpath(self.path) == os.path.realpath(DEFAULT_PATH)
        return {"name": "prose", "work": WORK, "author": AUTHOR, "year": 1876, "license": "public domain",
                "package": f"{DEB_PACKAGE} (Debian)" if shipped else None,
                "version": _deb_version() if shipped else None, "file": self.path, "file_sha256": digest}


@hookimpl
def register_datasets(register):
    register("prose", ProseText)
