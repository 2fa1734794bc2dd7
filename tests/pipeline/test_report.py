"""What a person reads after a run: the change column and report.md's header."""

from hfquant.pipeline.report import markdown, percent_change, summary_rows, windows_summary


def report(base: float, quantized: float) -> dict:
    return {"run": {"model": "tiny", "scheme": "w4a16", "observer": "minmax", "backend": "cpu", "backend_reason": "auto",
                    "algorithms": ["awq", "gptq"], "algorithm_reason": "auto: the best measured recipe"},
            "quantization": {"algorithms": ["awq", "gptq"]},
            "baseline": {"perplexity": {"perplexity": base}},
            "quantized": {"perplexity": {"perplexity": quantized, "kl_divergence": 0.001, "top1_agreement": 0.99}}}


def test_a_change_that_rounds_to_nothing_has_no_sign():
    assert percent_change(10.9607, 10.9611) == "0.00%"  # -0.004%: was printed as "-0.00%"
    assert percent_change(11.7952, 11.7673) == "+0.24%"
    assert percent_change(9.0, 10.0) == "-10.00%"
    assert summary_rows(report(10.9611, 10.9607))[0] == ["perplexity", "10.9611", "10.9607", "0.00%"]


def test_report_md_names_the_algorithm_that_chose_the_codes():
    header = markdown(report(10.0, 11.0)).splitlines()[2]
    assert header.startswith("Scheme `w4a16`, algorithms `awq`, `gptq` (auto: the best measured recipe), observer `minmax`")


def test_protocol_values_read_as_text_not_python_reprs():
    text = markdown({**report(10.0, 11.0), "protocol": {"dataset": {"name": "pydoc", "source": "CPython 3.11"},
                                                         "windows": 14}})
    assert "- **dataset**: name pydoc, source CPython 3.11" in text and "- **windows**: 14" in text


def test_the_calibration_status_names_the_windows_in_words():
    protocol = {"num_samples": 32, "seq_len": 512, "seed": 0, "dataset": {"name": "pydoc", "source": "pydoc_data"},
                "token_sha256": "ff58055f74e42e98", "generated": {"windows": 16, "seed": 0, "computed_in": "float32"}}
    assert windows_summary(protocol) == ("32 windows × 512 tokens of pydoc (16 of them written by the model), "
                                         "token sha256 ff58055f74e42e98")  # was the protocol dict's repr
    assert windows_summary({"num_samples": 4, "seq_len": 64, "dataset": {"name": "text"}}) == "4 windows × 64 tokens of text"
