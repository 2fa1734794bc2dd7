"""`text`: local .txt / .jsonl / .json / .parquet / .csv files through 🤗 `datasets`, one text column.

`files` are used for both parts unless `evaluation_files` is given: then `files` calibrate and
`evaluation_files` evaluate. With one set of files, rows alternate deterministically (every fifth row
evaluates) so the parts never overlap.

Every file is checked when the dataset is built (before the model loads): it exists, is a file, is not empty,
and is UTF-8 text without NUL bytes (Parquet: has Parquet's magic bytes), so `datasets`' own errors deep in a
run never reach the user.
"""

from __future__ import annotations

import codecs
import functools
import os
from typing import TYPE_CHECKING, List, Optional, Sequence

from hfquant import hookimpl
from hfquant.pipeline.data import DataError, MissingDataError

if TYPE_CHECKING:
    import datasets

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK = 1 << 20
UTF16_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _converted_name(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.utf8{ext}"


@functools.lru_cache(maxsize=256)
def _content_problem(real: str, path: str, builder: str, size: int, mtime_ns: int) -> Optional[str]:
    """What is wrong with the bytes of `path` (cached per size and mtime: the run checks early, builds again later)."""
    if size == 0:
        return "is empty (0 bytes); add text to it or leave it out"
    with open(real, "rb") as f:
        head = f.read(CHUNK)
        if builder == "parquet":
            return None if head[:4] == b"PAR1" else "is not a Parquet file (it does not start with PAR1); " \
                "save it with pandas' or datasets' to_parquet, or give it the extension of what it holds"
        if head.startswith(UTF16_BOMS):
            return (f"is UTF-16/32 text (it starts with a byte-order mark), not UTF-8; convert it: "
                    f"iconv -f utf-16 -t utf-8 {path!r} > {_converted_name(path)!r}")
        decoder, offset, has_text, chunk = codecs.getincrementaldecoder("utf-8")(), 0, False, head
        while chunk:
            nul = chunk.find(b"\0")
            if nul >= 0:
                return (f"looks binary (a NUL byte at byte {offset + nul}), not UTF-8 text; {builder} files must hold "
                        "plain text: point at the text itself, or extract it first (e.g. pdftotext for a PDF)")
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return _not_utf8(path, offset - pending + exc.start, exc.object[exc.start])
            has_text = has_text or bool(chunk.strip())
            offset += len(chunk)
            chunk = f.read(CHUNK)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return _not_utf8(path, size - len(decoder.getstate()[0]), None)
    return None if has_text else "has no text (only whitespace); add text to it or leave it out"


def _not_utf8(path: str, position: int, byte: Optional[int]) -> str:
    what = f"byte 0x{byte:02x}" if byte is not None else "a truncated character"
    return (f"is not UTF-8 text ({what} at byte {position}); convert it to UTF-8, e.g. from Latin-1: "
            f"iconv -f latin1 -t utf-8 {path!r} > {_converted_name(path)!r}")


def check_file(path: str, option: str) -> None:
    """Raise `DataError` (naming `option` and the file) unless `path` is a readable, non-empty text source."""
    where = f"(paths are relative to {os.getcwd()})" if not os.path.isabs(path) else ""
    if not os.path.lexists(path):
        raise MissingDataError(f"{option}: {path!r} does not exist {where}".rstrip(), option)
    if os.path.isdir(path):
        raise DataError(f"{option}: {path!r} is a folder; list the files in it instead, e.g. "
                        f"[{path.rstrip('/')}/a.txt,{path.rstrip('/')}/b.txt]", option)
    if not os.path.isfile(path):
        raise MissingDataError(f"{option}: {path!r} is not a regular file (a broken link or a device) {where}".rstrip(), option)
    ext = os.path.splitext(path)[1].lower()
    if ext not in BUILDERS:
        raise DataError(f"{option}: {path!r} has an unsupported extension; allowed: {', '.join(BUILDERS)}", option)
    try:
        st = os.stat(path)
        problem = _content_problem(os.path.realpath(path), path, BUILDERS[ext], st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise DataError(f"{option}: {path!r} cannot be read ({exc.strerror or exc})", option) from None
    if problem:
        raise DataError(f"{option}: {path!r} {problem}", option)


class TextFiles:
    def __init__(self, files: Sequence[str] = (), column: str = "text", evaluation_files: Optional[Sequence[str]] = None) -> None:
        if not files:
            raise DataError("files: dataset 'text' needs files, e.g. evaluation.files=[notes.txt] (txt, jsonl, parquet, csv)",
                            "files")
        for option, value in (("files", files), ("evaluation_files", evaluation_files)):
            if isinstance(value, str):
                raise DataError(f"{option}: give a list of files, e.g. [{value}], not a string", option)
        self.files = [str(f) for f in files]
        self.evaluation_files = [str(f) for f in evaluation_files] if evaluation_files else None
        self.column = column
        for option, paths in (("files", self.files), ("evaluation_files", self.evaluation_files or [])):
            for f in paths:
                check_file(f, option)
            kinds = {BUILDERS[os.path.splitext(f)[1].lower()] for f in paths}
            if len(kinds) > 1:
                raise DataError(f"{option}: mix of file kinds {sorted(kinds)}; use one kind per part", option)

    def _load(self, files: List[str], option: str) -> datasets.Dataset:
        import datasets  # here, not at the top: importing it takes a second that runs without data should not pay
        builder = BUILDERS[os.path.splitext(files[0])[1].lower()]
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as exc:  # malformed JSON lines, CSV or Parquet: datasets' message, our file names
            cause = exc.__cause__ or exc
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise DataError(f"{option}: {files} could not be read as {builder} ({type(cause).__name__}: {detail}); "
                            f"fix the file or give it the extension of what it holds", option) from exc
        if self.column not in ds.column_names:
            raise DataError(f"column: no column {self.column!r} in {files}; columns: {ds.column_names} "
                            "(set the dataset's column=...)", "column")
        return ds

    def load(self, part: str) -> datasets.Dataset:
        if self.evaluation_files:
            if part == "evaluation":
                return self._load(self.evaluation_files, "evaluation_files")
            return self._load(self.files, "files")
        ds = self._load(self.files, "files")
        keep = [i for i in range(len(ds)) if (i % 5 == 4) == (part == "evaluation")]
        return ds.select(keep)

    def texts(self, part: str) -> list:
        return [t for t in self.load(part)[self.column] if t and t.strip()]

    def where(self, part: str) -> str:
        """Which files (and rows) this part reads: what a too-short error names."""
        if self.evaluation_files:
            return f"evaluation_files {_names(self.evaluation_files)}" if part == "evaluation" else f"files {_names(self.files)}"
        unit = "paragraph" if BUILDERS[os.path.splitext(self.files[0])[1].lower()] == "text" else "row"
        rows = f"every fifth {unit}" if part == "evaluation" else f"four {unit}s in five; every fifth evaluates"
        return f"the {part} part of {_names(self.files)} ({rows})"

    def describe(self) -> dict:
        return {"name": "text", "files": self.files, "evaluation_files": self.evaluation_files}


def _names(files: List[str]) -> str:
    return ", ".join(repr(f) for f in files)


@hookimpl
def register_datasets(register):
    register("text", TextFiles)
