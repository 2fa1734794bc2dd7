"""A saved folder is checked against its own quantization_config before its weights load: an edited config
is refused naming the module and tensor, instead of loading into a model that computes garbage."""

import json

import pytest

import hfquant
from hfquant.formats.stored_check import StoredTensorMismatchError
from hfquant.pipeline.run import run
from tests.conftest import compose

MODULE = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def saved(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "run"
    run(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={out}", "calibration=none", "evaluation=none",
                 "scheme=w4a16", "scheme.weights.group_size=32", "backend=fake"]))
    return out / "model"


def edited(saved, tmp_path, edit):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_the_untouched_folder_loads(saved):
    assert hfquant.load_quantized(str(saved)) is not None


@pytest.mark.parametrize("field, value, message", [
    ("signed", False, rf"{MODULE}.weight_zero_point is I8\[160, 2\] in the file, the config implies U8\[160, 2\]"),
    ("num_bits", 8, rf"{MODULE}.weight_packed is U8\[160, 32\] in the file, the config implies U8\[160, 64\]"),
    ("group_size", 64, rf"{MODULE}.weight_scale is F32\[160, 2\] in the file, the config implies F32\[160, 1\]"),
])
def test_an_edited_module_entry_is_refused_naming_the_tensor(saved, tmp_path, field, value, message):
    def edit(qcfg):
        qcfg["modules"][MODULE]["weights"][field] = value

    with pytest.raises(StoredTensorMismatchError, match=message + r".*restore config.json"):
        hfquant.load_quantized(edited(saved, tmp_path, edit))


def test_an_unknown_module_or_a_newer_format_is_refused(saved, tmp_path):
    def unknown(qcfg):
        qcfg["modules"]["model.layers.9.mlp.up_proj"] = qcfg["modules"][MODULE]

    with pytest.raises(StoredTensorMismatchError, match="lists module 'model.layers.9.mlp.up_proj', which this model does not have"):
        hfquant.load_quantized(edited(saved, tmp_path / "a", unknown))

    def newer(qcfg):
        qcfg["format_version"] = 99

    with pytest.raises(StoredTensorMismatchError, match="format_version 99, newer than this hfquant understands"):
        hfquant.load_quantized(edited(saved, tmp_path / "b", newer))
