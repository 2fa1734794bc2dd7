"""compressed-tensors export: hfquant's own codes re-laid-out, loaded by plain transformers (+ compressed-tensors)
in a process where `import hfquant` fails, with the logits of hfquant's reference forward of the same codes."""

import json

import pytest
import torch

from hfquant.formats.compressed_tensors import (_as_int32_words, export_folder, logits_without_hfquant,
                                                 module_tensors, scheme_problem, shape_problems)
from hfquant.pipeline.run import run
from hfquant.pipeline.save import load_quantized
from hfquant.plugins import registries
from hfquant.quant import QuantArgs, pack
from tests.conftest import compose, tiny_overrides

pytest.importorskip("compressed_tensors")


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' documented layout, written independently: u = code + 2^(b−1), element k of a row at
    bits b·k of the row's little-endian bit stream, rows zero-padded to whole int32 words."""
    per = 32 // bits
    u = (codes.to(torch.int64) + 2 ** (bits - 1))
    rows, n = u.shape
    words = -(-n // per)
    out = torch.zeros(rows, words, dtype=torch.int64)
    for k in range(n):
        out[:, k // per] |= u[:, k] << (bits * (k % per))
    return out.where(out < 2**31, out - 2**32).to(torch.int32)


@pytest.mark.parametrize("bits, cols", [(4, 64), (4, 20), (8, 36), (8, 5)])
def test_hfquant_bytes_are_compressed_tensors_words(bits, cols):
    args = QuantArgs(num_bits=bits, strategy="channel")
    codes = torch.randint(args.qmin, args.qmax + 1, (6, cols), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int8)
    assert torch.equal(_as_int32_words(pack(codes, args)), reference_pack(codes, bits))


def test_zero_points_pack_along_output_rows():
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    zp = torch.randint(-8, 8, (16, 3), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    stored = {"weight_packed": torch.zeros(16, 48, dtype=torch.uint8), "weight_scale": torch.ones(16, 3),
              "weight_zero_point": zp}
    out = module_tensors(args, None, stored, 96, torch.float32)
    assert out["weight_zero_point"].shape == (2, 3) and out["weight_shape"].tolist() == [16, 96]
    assert torch.equal(out["weight_zero_point"], reference_pack(zp.t(), 4).t())


def test_refuses_what_its_consumers_cannot_run():
    schemes = registries().schemes
    assert scheme_problem(schemes.get("w4a16")) is None and scheme_problem(schemes.get("w8a16")) is None
    assert scheme_problem(schemes.get("w8a8")) is None
    assert "each token at run time" in scheme_problem(schemes.get("w8a8-static"))
    fz = schemes.get("w4a16-asym")
    fz = type(fz)(**{**fz.__dict__, "weights": fz.weights.replace(float_zero_point=True)})
    assert "integers" in scheme_problem(fz)
    g128 = QuantArgs(num_bits=4, strategy="group", group_size=128)
    assert shape_problems({"mlp.down_proj": (576, 1536), "q_proj": (576, 576)}, g128) == [
        "q_proj has 576 input columns, not a multiple of group_size=128"]


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-asym", "w8a16"])
def test_exported_folder_loads_without_hfquant_with_the_same_logits(tiny_llm_dir, tmp_path, scheme):
    extra = ["scheme.weights.group_size=32"] if scheme.startswith("w4") else []
    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", f"scheme={scheme}", "backend=fake", *extra)))
    src, dst = tmp_path / "run" / "model", tmp_path / "ct"
    summary = export_folder(str(src), str(dst))
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert summary["ignore"] == ["lm_head"]
    ids = torch.arange(1, 50)[None]
    with torch.no_grad():
        reference = load_quantized(str(src))(input_ids=ids).logits[0].float()
    logits = logits_without_hfquant(str(dst), ids, str(tmp_path))
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0), float((logits - reference).abs().max())


def test_w8a8_exports_int8_codes_and_transformers_reads_them_with_its_own_activation_rounding(tiny_llm_dir, tmp_path):
    """w8a8 → int-quantized: the int8 codes as `weight`, one scale per channel. transformers quantizes each token's
    activations with absmax/127.5, hfquant and vLLM with absmax/127: the folder's logits equal hfquant's codes under
    transformers' rounding exactly, and differ measurably under hfquant's own (so the check checks something)."""
    from hfquant.formats.compressed_tensors import ct_activation_reference
    from hfquant.formats.kernels import to_reference

    run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "scheme=w8a8", "backend=fake")))
    src, dst = tmp_path / "run" / "model", tmp_path / "ct"
    export_folder(str(src), str(dst))
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    assert qcfg["format"] == group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert weight.dtype == torch.int8 and "model.layers.0.mlp.up_proj.weight_zero_point" not in f.keys()
    ids = torch.randint(2, 400, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = to_reference(load_quantized(str(src)))
        own = reference(input_ids=ids).logits[0].float()
        theirs = ct_activation_reference(reference)(input_ids=ids).logits[0].float()
    logits = logits_without_hfquant(str(dst), ids, str(tmp_path))
    assert float((logits - theirs).abs().max()) <= 1e-5
    assert float((logits - own).abs().max()) > 1e-4


@pytest.mark.parametrize("pipeline, scheme", [("in_memory", ["scheme=w4a16", "scheme.weights.group_size=32"]),
                                              ("streaming", ["scheme=w4a16", "scheme.weights.group_size=32"]),
                                              ("streaming", ["scheme=w8a8"])], ids=["in_memory", "streaming", "w8a8-streaming"])
def test_format_compressed_tensors_run_writes_a_checked_folder(tiny_llm_dir, tmp_path, pipeline, scheme):
    out = tmp_path / "run"
    common = [*scheme, "format=compressed-tensors", f"pipeline={pipeline}"]
    if pipeline == "streaming":
        overrides = ["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={out}", "calibration=none",
                     "algorithm=rtn", "evaluation=none", *common]
    else:
        overrides = tiny_overrides(tiny_llm_dir, out, *common)
    report = run(compose(overrides))
    export = report["export"]
    assert export["check"]["ok"] and export["check"]["max_abs_logit_difference"] <= 1e-4
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and config["model_type"] == "llama"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == []
    card = (out / "model" / "README.md").read_text()
    assert "compressed-tensors" in card and "needs hfquant" not in card


def test_ragged_groups_are_refused_right_after_loading(tiny_llm_dir, tmp_path):
    from hfquant_builtins.formats.compressed_tensors_format import FormatShapeError

    with pytest.raises(FormatShapeError, match=r"160 input columns, not a multiple of group_size=64.*group_size=32"):
        run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "scheme=w4a16", "scheme.weights.group_size=64",
                                   "format=compressed-tensors")))
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("extra", [["max_shard_size=20KB"], ["model.dtype=bfloat16"],
                                   ["scheme=w8a16", "scheme.weights.symmetric=false"], ["scheme=w8a8", "backend=cpu"]],
                         ids=["sharded", "bf16-scales-rounded-before-codes", "int8-asym-channel", "w8a8-cpu"])
def test_export_variants_are_checked_without_hfquant(tiny_llm_dir, tmp_path, extra):
    scheme = [] if any(e.startswith("scheme=") for e in extra) else ["scheme=w4a16-asym", "scheme.weights.group_size=32"]
    report = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", *scheme, "format=compressed-tensors", *extra)))
    assert report["export"]["check"]["max_abs_logit_difference"] <= 1e-4
    size = report["quantized"]["size"]["bytes_on_disk"]
    assert size == sum(p.stat().st_size for p in (tmp_path / "run" / "model").iterdir() if p.name != "README.md")


def test_an_interrupted_swap_leaves_the_checked_hfquant_folder(tiny_llm_dir, tmp_path, monkeypatch):
    from hfquant.pipeline import run as run_module

    renames = []
    real = run_module.os.rename

    def rename(a, b):
        renames.append((a, b))
        if len(renames) == 2:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(run_module.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "scheme=w4a16", "scheme.weights.group_size=32",
                                   "format=compressed-tensors")))
    out = tmp_path / "run"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hfquant"
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp") or p.suffix == ".pt"] == []


def test_resume_refuses_an_exported_folder(tiny_llm_dir, tmp_path):
    from hfquant.pipeline.output import OutputExistsError

    out = tmp_path / "run"
    run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "scheme.weights.group_size=32", "format=compressed-tensors")))
    with pytest.raises(OutputExistsError, match="exported to another format"):
        run(compose(tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "scheme.weights.group_size=32", "resume=true")))
