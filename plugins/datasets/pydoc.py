"""`pydoc`: the documentation every CPython ships in `pydoc_data.topics` (~113k SmolLM2 tokens), offline.

Topics are sorted by name; every fifth topic (index % 5 == 4) is the evaluation part, the rest calibration,
so the two parts never share text and the split is the same on every machine with the same Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfquant import hookimpl

if TYPE_CHECKING:
    import datasets

PARTS = ("calibration", "evaluation")


class PydocText:
    """CPython's pydoc topics as a 🤗 `datasets.Dataset` with one topic per row."""

    def __init__(self, column: str = "text") -> None:
        self.column = column

    def load(self, part: str) -> datasets.Dataset:
        import datasets  # here, not at the top: importing it takes a second that runs without data should not pay
        from pydoc_data import topics

        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        names = sorted(topics.topics)
        wanted = [n for i, n in enumerate(names) if (i % 5 == 4) == (part == "evaluation")]
        return datasets.Dataset.from_dict({"topic": wanted, self.column: [topics.topics[n] for n in wanted]})

    def texts(self, part: str) -> list:
        return list(self.load(part)[self.column])

    def where(self, part: str) -> str:
        """What a too-short error names (a long seq_len can exceed even this part)."""
        return f"the {part} part of the pydoc topics ({'every fifth topic' if part == 'evaluation' else 'four topics in five'})"

    def describe(self) -> dict:
        import sys

        return {"name": "pydoc", "source": f"pydoc_data.topics of CPython {sys.version.split()[0]}"}


@hookimpl
def register_datasets(register):
    register("pydoc", PydocText)
