"""The `prose` dataset: Tom Sawyer's chapters split into disjoint, deterministic calibration/evaluation parts."""

import os

import pytest

from hfquant.pipeline.data import DataError, MissingDataError
from hfquant.plugins import registries
from hfquant_builtins.datasets.prose import DEFAULT_PATH

installed = pytest.mark.skipif(not os.path.isfile(DEFAULT_PATH), reason="Debian's golang-github-pierrec-lz4-dev is "
                               "not installed (scripts/setup installs it when run as root)")


def _prose(**options):
    return registries().datasets.get("prose")(**options)


def _fake_novel(path, chapters=12):
    roman = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV"]
    body = "\n\n\n".join(f"CHAPTER {roman[i]}\n\nChapter {i} begins\nhere, wrapped.\n\nIts second paragraph."
                         for i in range(chapters))
    path.write_text("Produced by a volunteer.\n\nA TITLE\n\n\n" + body + "\n\n\nCONCLUSION\n\nThe end.\n")
    return str(path)


def test_every_fifth_chapter_evaluates_and_lines_join_into_paragraphs(tmp_path):
    ds = _prose(path=_fake_novel(tmp_path / "novel.txt"))
    cal, ev = ds.load("calibration").to_dict(), ds.load("evaluation").to_dict()
    assert ev["chapter"] == ["CHAPTER V", "CHAPTER X"]
    assert not set(cal["chapter"]) & set(ev["chapter"]) and len(cal["text"]) + len(ev["text"]) == 13  # + conclusion
    assert ev["text"][0] == "Chapter 4 begins here, wrapped.\n\nIts second paragraph."
    assert all("Produced by" not in t and "CHAPTER" not in t for t in cal["text"] + ev["text"])
    assert ds.describe()["package"] is None  # a copy of the text, not the Debian package's file


def test_missing_or_wrong_file_is_named(tmp_path):
    with pytest.raises(MissingDataError, match="path: the text of 'The Adventures of Tom Sawyer'"):
        _prose(path=str(tmp_path / "absent.txt"))
    (tmp_path / "other.txt").write_text("Some other book.\n\nNo chapters here.\n")
    with pytest.raises(DataError, match="0 chapter heading"):
        _prose(path=str(tmp_path / "other.txt")).texts("evaluation")


@installed
def test_shipped_novel_parts_are_disjoint_deterministic_and_long_enough():
    ds = _prose()
    cal, ev = ds.load("calibration").to_dict(), ds.load("evaluation").to_dict()
    assert len(cal["text"]) == 29
    assert ev["chapter"] == [f"CHAPTER {n}" for n in ("V", "X", "XV", "XX", "XXV", "XXX", "XXXV")]
    assert not set(cal["text"]) & set(ev["text"])
    assert ds.texts("evaluation") == _prose().texts("evaluation")
    # SmolLM2's byte-level BPE gives every whitespace-separated word at least one token: a lower bound that
    # needs no tokenizer. Evaluation needs 16 × 512 tokens, the default calibration 32 × 512.
    assert len(" ".join(ds.texts("evaluation")).split()) >= 16 * 512
    assert len(" ".join(ds.texts("calibration")).split()) >= 32 * 512
    described = ds.describe()
    assert described["work"] == "The Adventures of Tom Sawyer" and described["author"] == "Mark Twain"
    assert described["package"].startswith("golang-github-pierrec-lz4-dev") and described["version"]
