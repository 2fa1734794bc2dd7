"""`hub` (any 🤗 Hub dataset: path, name, split, column) and `wikitext2` (wikitext-2-raw-v1, train/test).

Both need the Hub or a local cache; offline without a cache they fail with an error saying so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from hfquant import hookimpl
from hfquant.pipeline.data import DataError, DataUnavailableError

if TYPE_CHECKING:
    import datasets


class HubDataset:
    def __init__(self, path: str = "", config_name: Optional[str] = None, split: str = "train",
                 evaluation_split: Optional[str] = None, column: str = "text", revision: Optional[str] = None) -> None:
        if not path:
            raise DataError("path: dataset 'hub' needs a path, e.g. evaluation.path=Salesforce/wikitext evaluation.config_name=wikitext-2-raw-v1", "path")
        self.path, self.config_name, self.split, self.evaluation_split = path, config_name, split, evaluation_split
        self.column, self.revision = column, revision

    def load(self, part: str) -> datasets.Dataset:
        import datasets  # here, not at the top: importing it takes a second that runs without data should not pay
        split = self._split(part)
        try:
            ds = datasets.load_dataset(self.path, self.config_name, split=split, revision=self.revision)
        except Exception as exc:
            raise DataUnavailableError(
                f"could not load Hub dataset {self.path!r} (config_name={self.config_name!r}, split={split!r}): "
                f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}. Offline? "
                "Download it once online, or use evaluation=text with local files"
            ) from exc
        if self.column not in ds.column_names:
            raise DataError(f"column: Hub dataset {self.path!r} has no column {self.column!r}; columns: {ds.column_names}",
                            "column")
        if not self.evaluation_split:  # same split for both parts: alternate rows so they never overlap
            keep = [i for i in range(len(ds)) if (i % 5 == 4) == (part == "evaluation")]
            ds = ds.select(keep)
        return ds

    def texts(self, part: str) -> list:
        return [t for t in self.load(part)[self.column] if t and t.strip()]

    def _split(self, part: str) -> str:
        return self.evaluation_split if (part == "evaluation" and self.evaluation_split) else self.split

    def where(self, part: str) -> str:
        """What a too-short error names: the repository, the split and which of its rows this part uses."""
        rows = "" if self.evaluation_split else (" (every fifth row)" if part == "evaluation" else " (four rows in five)")
        return f"split {self._split(part)!r} of Hub dataset {self.path!r}{rows}"

    def describe(self) -> dict:
        return {"name": "hub", "path": self.path, "config_name": self.config_name, "split": self.split,
                "evaluation_split": self.evaluation_split, "revision": self.revision}


class WikiText2(HubDataset):
    """wikitext-2-raw-v1: calibration from `train`, evaluation on `test` (the standard perplexity protocol)."""

    def __init__(self, column: str = "text") -> None:
        super().__init__("Salesforce/wikitext", "wikitext-2-raw-v1", split="train", evaluation_split="test", column=column)

    def describe(self) -> dict:
        return dict(super().describe(), name="wikitext2")


@hookimpl
def register_datasets(register):
    register("hub", HubDataset)
    register("wikitext2", WikiText2)
