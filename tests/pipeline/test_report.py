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
    header = next(line for line in markdown(report(10.0, 11.0)).splitlines() if line.startswith("Scheme"))
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
    protocol["generated"]["shipped"] = "sampled once from these weights by the same recipe, shipped with hfquant"
    assert "(16 of them written by the model, shipped with hfquant)" in windows_summary(protocol)


def test_report_md_says_where_the_baseline_came_from_and_what_the_out_of_domain_rows_read():
    """A newcomer saw `windows: 14` beside prose rows computed on 16 windows, and no word that the float baseline
    was dequantized from a 4-bit GGUF file (only the model card said so)."""
    r = report(10.0, 11.0)
    r["run"]["gguf_file"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    r["protocol"] = {"dataset": {"name": "pydoc"}, "windows": 14}
    r["comparison"] = {"out_of_domain": {
        "dataset": "prose", "protocol": {"dataset": {"name": "prose", "source": "Tom Sawyer"}, "windows": 16},
        "baseline": {"perplexity": {"perplexity": 40.0}}, "quantized": {"perplexity": {"perplexity": 44.0}}}}
    text = markdown(r)
    assert "read from its GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`, dequantized to float32 on load" in text
    in_domain, out_of_domain = text.split("Out of the calibration domain (`prose`, the rows that name it):")
    assert "- **windows**: 14" in in_domain and "- **windows**: 16" in out_of_domain.split("##")[0]
    assert "name prose, source Tom Sawyer" in out_of_domain
    assert "GGUF" not in markdown(report(10.0, 11.0))  # a safetensors model: no such sentence
