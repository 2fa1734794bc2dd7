"""`text`: local .txt / .jsonl / .json / .parquet / .csv files through 🤗 `datasets`, one text column.

`files` are used for both parts unless `evaluation_files` is given: then `files` calibrate and
`evaluation_files` evaluate. With one set of files, rows alternate deterministically (every fifth row
evaluates) so the parts never overlap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional, Sequence

from hfquant import hookimpl

if TYPE_CHECKING:
    import datasets

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class TextFiles:
    def __init__(self, files: Sequence[str] = (), column: str = "text", evaluation_files: Optional[Sequence[str]] = None) -> None:
        if not files:
            raise ValueError("dataset 'text' needs files, e.g. evaluation.files=[notes.txt] (txt, jsonl, parquet, csv)")
        self.files = [str(f) for f in files]
        self.evaluation_files = [str(f) for f in evaluation_files] if evaluation_files else None
        self.column = column
        for f in self.files + (self.evaluation_files or []):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"dataset 'text': file {f!r} does not exist (paths are relative to {os.getcwd()})")
            if os.path.splitext(f)[1].lower() not in BUILDERS:
                raise ValueError(f"dataset 'text': {f!r} has an unsupported extension; allowed: {', '.join(BUILDERS)}")

    def _load(self, files: List[str]) -> datasets.Dataset:
        import datasets  # here, not at the top: importing it takes a second that runs without data should not pay
        kinds = {BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
        if len(kinds) != 1:
            raise ValueError(f"dataset 'text': mix of file kinds {sorted(kinds)}; use one kind per part")
        builder = kinds.pop()
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        if self.column not in ds.column_names:
            raise ValueError(f"dataset 'text': no column {self.column!r} in {files}; columns: {ds.column_names}")
        return ds

    def load(self, part: str) -> datasets.Dataset:
        if self.evaluation_files:
            return self._load(self.evaluation_files if part == "evaluation" else self.files)
        ds = self._load(self.files)
        keep = [i for i in range(len(ds)) if (i % 5 == 4) == (part == "evaluation")]
        return ds.select(keep)

    def texts(self, part: str) -> list:
        return [t for t in self.load(part)[self.column] if t and t.strip()]

    def describe(self) -> dict:
        return {"name": "text", "files": self.files, "evaluation_files": self.evaluation_files}


@hookimpl
def register_datasets(register):
    register("text", TextFiles)
