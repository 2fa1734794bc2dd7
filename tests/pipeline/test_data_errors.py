"""Bad data files and too-short parts: one clear `DataError` naming the config key, the file and the way out,
raised before the model loads (files) or with the part's token count (too short for one window)."""

import json
import logging
import os
import subprocess
import sys

import pytest

from hfquant.config import validate
from hfquant.pipeline import data as data_mod
from hfquant.pipeline.data import DataError, MissingDataError
from hfquant.pipeline.run import run
from tests.conftest import compose

def tiny_overrides(model_dir, out, *extra):
    algorithm = [] if any(e.startswith("algorithm=") for e in extra) else ["algorithm=rtn"]
    return ["model=hub", f"model.path={model_dir}", f"output_dir={out}", *extra, *algorithm]


PARAGRAPHS = "\n\n".join(f"Paragraph {i} says something about integer quantization of weights." for i in range(10))


def _bad_files(tmp_path):
    """name → (path, the message fragment its error must contain)."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    (tmp_path / "latin1.txt").write_bytes("Ein Café für alle.\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "utf16.txt").write_bytes("hello".encode("utf-16"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "fake.parquet").write_text("not parquet")
    late = tmp_path / "late.jsonl"  # the bad byte is past the first 1 MiB chunk, split across the boundary
    late.write_bytes(b'{"text": "' + b"a" * ((1 << 20) - 11) + "é".encode() + b'\xff"}\n')
    return {
        "empty": ("empty.txt", "is empty (0 bytes); add text to it or leave it out"),
        "whitespace": ("blank.txt", "has no text (only whitespace)"),
        "latin1": ("latin1.txt", "is not UTF-8 text (byte 0xe9 at byte 7); convert it to UTF-8, e.g. from Latin-1: "
                                 "iconv -f latin1 -t utf-8"),
        "binary": ("binary.txt", "looks binary (a NUL byte at byte 8), not UTF-8 text"),
        "utf16": ("utf16.txt", "is UTF-16/32 text (it starts with a byte-order mark), not UTF-8; convert it: iconv -f utf-16"),
        "folder": ("folder", "is a folder; list the files in it instead"),
        "missing": ("missing.txt", "does not exist"),
        "parquet": ("fake.parquet", "is not a Parquet file (it does not start with PAR1)"),
        "late": ("late.jsonl", f"is not UTF-8 text (byte 0xff at byte {(1 << 20) + 1})"),
    }


@pytest.mark.parametrize("case", ["empty", "whitespace", "latin1", "binary", "utf16", "folder", "missing", "parquet", "late"])
def test_a_bad_evaluation_file_fails_before_the_model_loads(tiny_llm_dir, tmp_path, caplog, case):
    name, fragment = _bad_files(tmp_path)[case]
    path = tmp_path / name
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="hfquant")
    overrides = tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "evaluation=text", f"evaluation.files=['{path}']",
                               "calibration=none", "algorithm=rtn")
    with pytest.raises(DataError) as err:
        run(compose(overrides))
    assert str(err.value).startswith(f"evaluation.files: {str(path)!r} ")
    assert fragment in str(err.value)
    assert not any("stage: load" in r.getMessage() for r in caplog.records)  # the model was never loaded
    assert not out.exists()  # nothing written either
    if case == "missing":
        assert isinstance(err.value, MissingDataError) and isinstance(err.value, FileNotFoundError)


def test_a_bad_calibration_file_fails_before_the_model_loads(tiny_llm_dir, tmp_path, caplog):
    name, fragment = _bad_files(tmp_path)["latin1"]
    caplog.set_level(logging.INFO, logger="hfquant")
    overrides = tiny_overrides(tiny_llm_dir, tmp_path / "out", "scheme=w8a8-static", "evaluation=none",
                               "calibration=text", f"calibration.files=['{tmp_path / name}']")
    with pytest.raises(DataError, match=r"^calibration\.files: .*latin1\.txt' is not UTF-8 text"):
        run(compose(overrides))
    assert not any("stage: load" in r.getMessage() for r in caplog.records)


def test_evaluation_files_are_checked_under_their_own_key(tiny_llm_dir, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(PARAGRAPHS)
    (tmp_path / "empty.txt").write_bytes(b"")
    overrides = tiny_overrides(tiny_llm_dir, tmp_path / "out", "evaluation=text", f"evaluation.files=['{good}']",
                               f"+evaluation.evaluation_files=['{tmp_path / 'empty.txt'}']", "calibration=none", "algorithm=rtn")
    with pytest.raises(DataError, match=r"^evaluation\.evaluation_files: .*empty\.txt' is empty"):
        run(compose(overrides))


def test_an_unused_bad_calibration_file_does_not_stop_a_weight_only_run(tiny_llm_dir, tmp_path):
    """w8a16 observes weights only: calibration data is never read, so it is not checked either."""
    (tmp_path / "empty.txt").write_bytes(b"")
    spec = validate(compose(tiny_overrides(tiny_llm_dir, tmp_path / "out", "scheme=w8a16", "evaluation=none",
                                           "calibration=text", f"calibration.files=['{tmp_path / 'empty.txt'}']")))
    assert data_mod.parts_used(spec) == []
    data_mod.check_sources(spec)


def test_cli_prints_one_line_and_exits_2(tiny_llm_dir, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("Übung macht den Meister.\n".encode("latin-1"))
    cmd = [sys.executable, "-m", "hfquant", *tiny_overrides(tiny_llm_dir, tmp_path / "out", "evaluation=text",
                                                            f"evaluation.files=['{path}']", "calibration=none", "algorithm=rtn")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"hfquant: error: evaluation.files: {str(path)!r} is not UTF-8 text (byte 0xdc at byte 0); convert "
                     f"it to UTF-8, e.g. from Latin-1: iconv -f latin1 -t utf-8 {str(path)!r} > "
                     f"{str(tmp_path / 'notes.utf8.txt')!r}"]


def test_malformed_json_lines_name_the_file(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    spec = validate(compose(["evaluation=text", f"evaluation.files=['{bad}']", "calibration=none", "algorithm=rtn",
                             f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(DataError, match=r"^evaluation\.files: \[.*rows\.jsonl'\] could not be read as json \("):
        data_mod.windows(None, spec, "evaluation")


# Too short for one window: which data, how many tokens, how many one window needs, the way out.

def test_a_file_shorter_than_one_window_says_how_many_tokens_it_has(tiny_llm_dir, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(PARAGRAPHS)
    overrides = tiny_overrides(tiny_llm_dir, tmp_path / "out", "evaluation=text", f"evaluation.files=['{path}']",
                               "evaluation.seq_len=256", "calibration=none", "algorithm=rtn")
    with pytest.raises(DataError) as err:
        run(compose(overrides))
    message = str(err.value)
    prefix = (f"evaluation needs at least seq_len = 256 tokens, but the evaluation part of {str(path)!r} "
              "(every fifth paragraph) has ")
    assert message.startswith(prefix), message
    tokens = int(message[len(prefix):].split()[0])
    assert 0 < tokens < 256
    assert message.endswith(f"tokens, less than one window; lower evaluation.seq_len (to {tokens} or less) or add text")


def test_an_empty_part_says_it_has_no_tokens(tiny_tokenizer, tmp_path):
    path = tmp_path / "three.txt"
    path.write_text("One.\n\nTwo.\n\nThree.")  # every fifth paragraph evaluates: none here
    spec = validate(compose(["evaluation=text", f"evaluation.files=['{path}']", "evaluation.seq_len=64",
                             "calibration=none", "algorithm=rtn", f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(DataError, match=r"but the evaluation part of .*three\.txt' \(every fifth paragraph\) has 0 "
                                        r"tokens, less than one window; lower evaluation\.seq_len or add text"):
        data_mod.windows(tiny_tokenizer, spec, "evaluation")


def test_a_short_calibration_part_names_its_files_and_the_tokens_needed(tiny_tokenizer, tmp_path):
    path = tmp_path / "cal.txt"
    path.write_text(PARAGRAPHS)
    spec = validate(compose(["scheme=w8a8-static", "calibration=text", f"calibration.files=['{path}']",
                             "calibration.seq_len=256", "calibration.num_samples=4", "evaluation=none",
                             f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(DataError, match=r"calibration needs num_samples × seq_len = 4 × 256 = 1024 tokens, but the "
                                        r"calibration part of .*cal\.txt' \(four paragraphs in five; every fifth "
                                        r"evaluates\) has \d+ tokens \(\d window\(s\) of 256 fit\); lower "
                                        r"calibration\.num_samples or calibration\.seq_len, or add text"):
        data_mod.windows(tiny_tokenizer, spec, "calibration")


def test_pydoc_too_short_names_the_part(tiny_tokenizer, tmp_path):
    spec = validate(compose(["evaluation.seq_len=100000000", "calibration=none", "algorithm=rtn", f"output_dir={tmp_path / 'out'}"]))
    n = data_mod.token_stream(tiny_tokenizer, data_mod.build_dataset(spec, "evaluation").texts("evaluation")).numel()
    with pytest.raises(DataError, match=rf"at least seq_len = 100000000 tokens, but the evaluation part of the pydoc "
                                        rf"topics \(every fifth topic\) has {n} tokens, less than one window; lower "
                                        rf"evaluation\.seq_len \(to {n} or less\)"):
        data_mod.windows(tiny_tokenizer, spec, "evaluation")


def test_hub_dataset_too_short_names_repository_and_split(tiny_tokenizer, tmp_path):
    repo = tmp_path / "repo"  # a local dataset folder: `datasets.load_dataset` reads it as it reads a Hub repo
    repo.mkdir()
    (repo / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(10)) + "\n")
    spec = validate(compose(["evaluation=hub", f"evaluation.path={repo}", "evaluation.split=train",
                             "evaluation.seq_len=512", "calibration=none", "algorithm=rtn", f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(DataError, match=rf"but split 'train' of Hub dataset '{repo}' \(every fifth row\) has \d+ "
                                        r"tokens, less than one window"):
        data_mod.windows(tiny_tokenizer, spec, "evaluation")
    spec = validate(compose(["evaluation=hub", f"evaluation.path={repo}", "evaluation.split=train", "evaluation.column=body",
                             "calibration=none", "algorithm=rtn", f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(DataError, match=r"^evaluation\.column: Hub dataset .* has no column 'body'; columns: \['text'\]"):
        data_mod.windows(tiny_tokenizer, spec, "evaluation")
