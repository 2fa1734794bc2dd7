"""Token windows and datasets: seeded calibration, pinned evaluation windows, disjoint parts, clear errors."""

import json

import pytest
import torch

from hfquant.pipeline.data import DataError, calibration_windows, evaluation_windows, token_stream
from hfquant.plugins import registries


def test_calibration_windows_are_seeded_distinct_and_sized():
    stream = torch.arange(1000)
    a = calibration_windows(stream, num_samples=5, seq_len=64, seed=0)
    b = calibration_windows(stream, num_samples=5, seq_len=64, seed=0)
    c = calibration_windows(stream, num_samples=5, seq_len=64, seed=1)
    assert a.input_ids.shape == (5, 64) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    starts = a.input_ids[:, 0].tolist()
    assert len(set(starts)) == 5 and all(s % 64 == 0 for s in starts)  # non-overlapping chunks
    assert a.protocol["tokens"] == 320


def test_too_little_data_says_how_many_tokens_there_are():
    with pytest.raises(DataError, match=r"needs num_samples × seq_len = 10 × 64 = 640 tokens, but the calibration data has 300 tokens"):
        calibration_windows(torch.arange(300), num_samples=10, seq_len=64, seed=0)
    with pytest.raises(DataError, match="at least seq_len = 512 tokens, but the evaluation data has 300"):
        evaluation_windows(torch.arange(300), seq_len=512, max_windows=None)


def test_evaluation_windows_are_consecutive_and_capped():
    w = evaluation_windows(torch.arange(1000), seq_len=100, max_windows=4)
    assert w.input_ids.shape == (4, 100) and w.input_ids[1, 0] == 100
    assert w.protocol["scored_tokens_per_window"] == 99 and w.protocol["stride"] == 100
    assert len(evaluation_windows(torch.arange(1000), seq_len=100, max_windows=None)) == 10


def test_pydoc_parts_are_disjoint_and_deterministic(tiny_tokenizer):
    ds = registries().datasets.get("pydoc")()
    cal, ev = ds.load("calibration"), ds.load("evaluation")
    assert not set(cal["topic"]) & set(ev["topic"])
    assert len(ev) > 0 and len(cal) > 3 * len(ev)
    assert ds.texts("evaluation") == ds.texts("evaluation")
    ids = token_stream(tiny_tokenizer, ds.texts("evaluation"))
    assert ids.dtype == torch.long and ids.numel() > 10000


@pytest.mark.parametrize("ext", ["txt", "jsonl", "parquet"])
def test_text_dataset_reads_local_files(tmp_path, ext):
    paragraphs = [f"Paragraph number {i} talks about quantization." for i in range(20)]
    path = tmp_path / f"data.{ext}"
    if ext == "txt":
        path.write_text("\n\n".join(paragraphs))
    elif ext == "jsonl":
        path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    else:
        import datasets

        datasets.Dataset.from_dict({"text": paragraphs}).to_parquet(str(path))
    ds = registries().datasets.get("text")(files=[str(path)])
    cal, ev = ds.texts("calibration"), ds.texts("evaluation")
    assert len(cal) == 16 and len(ev) == 4 and not set(cal) & set(ev)


def test_text_dataset_errors_name_the_problem(tmp_path):
    cls = registries().datasets.get("text")
    with pytest.raises(ValueError, match="needs files"):
        cls(files=[])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        cls(files=[str(tmp_path / "missing.txt")])
    bad = tmp_path / "data.docx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported extension"):
        cls(files=[str(bad)])
    ok = tmp_path / "a.jsonl"
    ok.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        cls(files=[str(ok)]).texts("calibration")


def test_hub_dataset_offline_says_what_to_do():
    ds = registries().datasets.get("wikitext2")()
    with pytest.raises(RuntimeError, match="Offline\\? Download it once online, or use evaluation=text"):
        ds.texts("evaluation")
