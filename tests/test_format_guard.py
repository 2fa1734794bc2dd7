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
    run(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={out}", "calibration=none", "algorithm=rtn", "evaluation=none",
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
        if field == "signed":  # unsigned codes cannot be full range: drop it, so only the tensor check can refuse
            qcfg["modules"][MODULE]["weights"].pop("full_range", None)

    with pytest.raises(StoredTensorMismatchError, match=message + r".*restore config.json"):
        hfquant.load_quantized(edited(saved, tmp_path, edit))


@pytest.mark.parametrize("edit", [
    lambda m: m["weights"].update(symmetric=False, full_range=False),  # no stored tensor differs
    lambda m: m.update(input_activations={"num_bits": 8, "strategy": "token", "dynamic": True}),  # none stored
], ids=["weights.symmetric", "dynamic-activations"])
def test_an_edit_the_tensors_cannot_show_is_refused_by_the_entry_digest(saved, tmp_path, edit):
    with pytest.raises(StoredTensorMismatchError, match=rf"config.json was edited after the weights were written: the "
                                                        rf"entries of {MODULE} no longer match the digest"):
        hfquant.load_quantized(edited(saved, tmp_path, lambda qcfg: edit(qcfg["modules"][MODULE])))


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["modules"].pop(MODULE), rf"1 module\(s\) have quantized tensors in the file but no entry in "
                                         rf"quantization_config.modules: {MODULE}\)"),
    (lambda q: q.update(modules=None), r"14 module\(s\) have quantized tensors in the file but no entry"),
    (lambda q: q.update(modules=list(q["modules"])), r"quantization_config.modules in config.json must map module "
                                                     r"names to entries, found list"),
    (lambda q: q["modules"].update({MODULE: "int4"}), rf"quantization_config entry for '{MODULE}' is malformed"),
    (lambda q: q.update(format_version="two"), r"format_version in config.json must be an integer, found 'two'"),
], ids=["entry-removed", "modules-null", "modules-list", "entry-string", "version-string"])
def test_a_missing_or_malformed_entry_is_refused_before_weights_load(saved, tmp_path, edit, message):
    with pytest.raises(StoredTensorMismatchError, match=message):
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


WITHOUT_HFQUANT = """
import sys
sys.modules["hfquant"] = None  # what anyone without hfquant has: the import fails
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("loaded")
"""


def test_plain_transformers_without_hfquant_refuses_the_folder_loudly(saved):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", WITHOUT_HFQUANT, str(saved)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr[-2000:]
    assert "pip install hfquant, then import hfquant before from_pretrained" in result.stdout


def test_a_loaded_model_saved_again_stays_guarded(saved, tmp_path):
    import subprocess
    import sys

    import torch

    from hfquant.formats.config_guard import GUARD_MODEL_TYPE

    model = hfquant.load_quantized(str(saved))
    model.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["model_type"] == GUARD_MODEL_TYPE and cfg["quantization_config"]["base_model_type"] == "llama"
    assert model.config.model_type == "llama"  # the live config keeps its class
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hfquant.load_quantized(str(tmp_path / "again"))(ids).logits)
    result = subprocess.run([sys.executable, "-c", WITHOUT_HFQUANT, str(tmp_path / "again")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 3 and "pip install hfquant" in result.stdout, result.stdout + result.stderr[-2000:]


def test_the_model_card_says_so_in_its_first_lines(saved):
    card = (saved / "README.md").read_text().split("---", 2)[2].strip().splitlines()
    assert "pip install hfquant" in " ".join(card[:4])


def test_a_format_version_1_folder_still_loads(saved, tmp_path):
    def version_1(cfg):
        qcfg = cfg["quantization_config"]
        cfg["model_type"] = qcfg.pop("base_model_type")
        qcfg["format_version"] = 1
        for entry in qcfg["modules"].values():  # written before entry digests existed
            entry.pop("digest")

    folder = tmp_path / "v1"
    import shutil

    import torch

    shutil.copytree(saved, folder)
    cfg = json.loads((folder / "config.json").read_text())
    version_1(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        old = hfquant.load_quantized(str(folder))(ids).logits
        new = hfquant.load_quantized(str(saved))(ids).logits
    assert torch.equal(old, new)
