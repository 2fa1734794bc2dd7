"""`hfquant --help` and typo'd command lines answer from the config nodes an earlier command saved, without
loading plugins or torch — and never from a copy that an installed, edited or filtered plugin has made stale."""

import dataclasses
import enum
import json
import os
import subprocess
import sys
import textwrap

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hfquant import config_nodes, plugins
from tests.conftest import fake_distribution


def hfquant(*args, cache, env=None):
    """`python -X importtime -m hfquant ...`: stderr also lists every module the command imported."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", HFQUANT_CACHE=str(cache), **(env or {}))
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "hfquant", *args], capture_output=True,
                          text=True, timeout=300, env=full_env)


def imported(result) -> set:
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def messages(result) -> str:
    return "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))


def saved_copies(cache) -> list:
    folder = cache / "config-nodes"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_help_and_typos_answer_without_torch_once_the_nodes_are_saved(tmp_path):
    cache = tmp_path / "cache"
    first = hfquant("--help", "scheme=w8a8", cache=cache)
    assert first.returncode == 0, messages(first)
    assert "torch" in imported(first) and len(saved_copies(cache)) == 1  # made from the plugins, then saved
    mask = os.umask(0)
    os.umask(mask)
    [copy] = (cache / "config-nodes").iterdir()
    assert copy.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by whoever shares the cache, as `open()` makes
    again = hfquant("--help", "scheme=w8a8", cache=cache)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert not {m for m in imported(again) if m.split(".")[0] in ("torch", "hfquant_builtins", "transformers")}

    cold_typo = hfquant("scheme=w4a61", f"output_dir={tmp_path / 'o'}", cache=tmp_path / "empty-cache")
    warm_typo = hfquant("scheme=w4a61", f"output_dir={tmp_path / 'o'}", cache=cache)
    assert warm_typo.returncode == cold_typo.returncode == 2
    assert messages(warm_typo) == messages(cold_typo) == (
        "hfquant: error: scheme: unknown scheme 'w4a61'; registered: fp4, int8-tensor, llm-int8, nf4, w4a16, "
        "w4a16-asym, w8a16, w8a8, w8a8-static. Did you mean 'w4a16'?")
    assert "torch" not in imported(warm_typo) and not (tmp_path / "o").exists()
    for bad, message in [  # a key, and the second job of a sweep: the same line as from the plugins
        (["sceme=w8a16"], "hfquant: error: unknown key 'sceme'; did you mean 'scheme'?"),
        (["-m", "observer=minmax,percentil"], "hfquant: error: sweep job #1 (observer=percentil): observer: unknown "
         "observer 'percentil'; registered: minmax, moving-average, mse, percentile. Did you mean 'percentile'? "
         "(no job was run)"),
    ]:
        warm, cold = hfquant(*bad, cache=cache), hfquant(*bad, cache=tmp_path / "empty-cache")
        assert warm.returncode == cold.returncode == 2 and "torch" not in imported(warm)
        assert messages(warm) == messages(cold) == message


def test_a_command_line_that_composes_still_gets_the_full_check(tmp_path):
    """Composing with the saved nodes finds typos and bit widths no backend declares; any other value a backend
    refuses (a group size its kernels cannot tile) still needs the plugins."""
    cache = tmp_path / "cache"
    assert hfquant("--help", cache=cache).returncode == 0 and saved_copies(cache)
    result = hfquant("scheme.weights.group_size=48", "backend=cpu", f"output_dir={tmp_path / 'o'}", cache=cache)
    assert result.returncode == 2 and "multiple of 32" in messages(result) and "torch" in imported(result)


def test_a_bit_width_no_backend_runs_is_refused_without_torch(tmp_path):
    """Each backend's declared `weight_bits` is saved with the nodes: a width none of them (or not the chosen one)
    runs is refused before any plugin loads, with the line the plugins give, in a sweep's job too."""
    cache = tmp_path / "cache"
    assert hfquant("--help", cache=cache).returncode == 0
    [copy] = saved_copies(cache)
    saved = json.loads((cache / "config-nodes" / copy).read_text())["weight_bits"]
    assert saved == {"bitsandbytes": [], "cpu": [4, 8], "fake": [2, 4, 8]}
    for n, bad in enumerate((["scheme.weights.num_bits=3"], ["scheme.weights.num_bits=2", "backend=cpu"],
                             ["-m", "scheme.weights.num_bits=4,3"])):
        warm = hfquant(*bad, f"output_dir={tmp_path / 'o'}", cache=cache)
        cold = hfquant(*bad, f"output_dir={tmp_path / 'o'}", cache=tmp_path / f"empty-cache-{n}")
        assert warm.returncode == cold.returncode == 2 and "torch" not in imported(warm) and "torch" in imported(cold)
        assert messages(warm) == messages(cold) and "-bit weights" in messages(warm)
    assert "sweep job #1 (scheme.weights.num_bits=3)" in messages(warm) and not (tmp_path / "o").exists()


def test_a_backend_that_declares_no_widths_is_asked_itself(tmp_path):
    """A plugin backend without `weight_bits` may run any width: nothing is refused before its `supports` answers."""
    cache, site = tmp_path / "cache", tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "hfquant-tri", "tri_plugin", """
        from hfquant import hookimpl

        class TriBackend:
            name = "tri"

            @staticmethod
            def supports(scheme, device):
                return None if scheme.weights.num_bits == 3 else "3-bit weights only"

        @hookimpl
        def register_backends(register):
            register("tri", TriBackend)
    """)
    env = {"PYTHONPATH": str(site)}
    assert hfquant("--help", cache=cache, env=env).returncode == 0
    [copy] = saved_copies(cache)
    assert json.loads((cache / "config-nodes" / copy).read_text())["weight_bits"]["tri"] is None
    result = hfquant("scheme.weights.num_bits=3", "model.path=", cache=cache, env=env)
    assert result.returncode == 2 and "torch" in imported(result)
    assert "-bit weights" not in messages(result) and "model.path is empty" in messages(result)


def _plugin(site, module: str, observer: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(f"""
        from hfquant import hookimpl
        from hfquant_builtins.observers.minmax import MinMaxObserver

        @hookimpl
        def register_observers(register):
            register({observer!r}, MinMaxObserver)
    """))


def test_a_plugin_installed_edited_or_filtered_out_after_the_copy_was_saved_shows_as_it_is(tmp_path):
    cache, site = tmp_path / "cache", tmp_path / "site"
    site.mkdir()
    env = {"PYTHONPATH": str(site)}
    assert hfquant("--help", cache=cache, env=env).returncode == 0 and saved_copies(cache)
    fake_distribution(site, "hfquant-sigma", "sigma_plugin", "")
    _plugin(site, "sigma_plugin", "sigma")  # the module's real contents (rewritten below to edit it)

    def observers(extra_env=None) -> str:
        out = hfquant("--help", cache=cache, env={**env, **(extra_env or {})})
        assert out.returncode == 0, messages(out)
        return next(line for line in out.stdout.splitlines() if line.startswith("observer: "))

    assert observers().endswith(", sigma")  # installed after the copy was saved
    _plugin(site, "sigma_plugin", "sigma2")
    os.utime(site / "sigma_plugin.py", ns=(0, os.stat(site / "sigma_plugin.py").st_mtime_ns + 10**9))
    assert observers().endswith(", sigma2")  # edited in place, same version
    assert "sigma" not in observers({"HFQUANT_LOAD_PLUGINS": ""})  # loaded by none
    assert len(saved_copies(cache)) == 4


def test_a_damaged_copy_is_made_again(tmp_path):
    cache = tmp_path / "cache"
    assert hfquant("--help", cache=cache).returncode == 0
    [name] = saved_copies(cache)
    (cache / "config-nodes" / name).write_text('{"format": 1, "nodes": [{"name": ')
    result = hfquant("--help", cache=cache)
    assert result.returncode == 0 and "== Config groups" in result.stdout
    assert json.loads((cache / "config-nodes" / name).read_text())["nodes"]  # saved whole again


@dataclasses.dataclass
class ToyOptions:
    strength: float = 0.5
    layers: tuple = (1, 2)


def _with_plugin_configs(nodes: dict):
    """A plugin whose `register_configs` stores `nodes` ({(group, name): node}), registered in a fresh manager."""

    class Presets:
        @plugins.hookspecs.hookimpl
        def register_configs(self, config_store):
            for (group, name), node in nodes.items():
                config_store.store(group=group, name=name, node=node)

    plugins.reset()
    plugins.get_plugin_manager().register(Presets(), name="presets")


def _composed(overrides) -> str:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hfquant.conf", version_base="1.3"):
        return OmegaConf.to_yaml(compose(config_name="config", overrides=overrides))


def test_saved_nodes_compose_to_the_same_config_plugin_dataclasses_included(tmp_path, monkeypatch):
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    store = ConfigStore.instance()
    overrides = ["+toy=default", "observer=sigma-3", "algorithm=[awq,gptq]", "scheme=w8a8"]
    try:
        _with_plugin_configs({("toy", "default"): ToyOptions,
                              ("observer", "sigma-3"): {"name": "percentile", "options": {"percentile": 99.0}}})
        config_nodes.register_config_nodes(store, save=True)
        made = {k: OmegaConf.to_yaml(n.node) for k, n in config_nodes._entries(store).items()}
        made_config = _composed(overrides)
        assert len(saved_copies(tmp_path / "cache")) == 1
        assert config_nodes.register_saved_config_nodes(store)
        read = {k: OmegaConf.to_yaml(n.node) for k, n in config_nodes._entries(store).items() if k in made}
        assert read == made and read[("toy", "default.yaml")] == "strength: 0.5\nlayers:\n- 1\n- 2\n"
        assert _composed(overrides) == made_config and "sigma-3" not in made_config  # the preset's values
        assert "percentile: 99.0" in made_config
    finally:
        plugins.reset()
        store.repo.pop("toy", None)
        store.repo["observer"].pop("sigma-3.yaml", None)


class Mode(enum.Enum):
    FAST = 1


def test_nodes_that_would_not_read_back_the_same_are_not_saved(tmp_path, monkeypatch):
    """An Enum value in a plain node is written as its name and would read back as a string: no copy is saved, so
    help makes the nodes from the plugins each time rather than show (or compose) something else."""
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    store = ConfigStore.instance()
    try:
        _with_plugin_configs({("toy", "modes"): {"mode": Mode.FAST}})
        config_nodes.register_config_nodes(store, save=True)
        assert store.repo["toy"]["modes.yaml"].node.mode == Mode.FAST
        assert saved_copies(tmp_path / "cache") == []
        assert not config_nodes.register_saved_config_nodes(store)
    finally:
        plugins.reset()
        store.repo.pop("toy", None)


def test_only_the_cli_saves_and_a_run_drops_the_copys_nodes(tmp_path, monkeypatch):
    """A library or a plugin's own test calling `register_config_nodes()` leaves the shared cache alone; nodes a
    saved copy stored are removed before the plugins' own are made (an option the copy had and the plugins no
    longer register does not stay choosable)."""
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    store = ConfigStore.instance()
    try:
        _with_plugin_configs({("toy", "old"): {"x": 1}})
        config_nodes.register_config_nodes(store)
        assert saved_copies(tmp_path / "cache") == []
        config_nodes.register_config_nodes(store, save=True)
        assert config_nodes.register_saved_config_nodes(store) and "old.yaml" in store.repo["toy"]
        _with_plugin_configs({("toy", "new"): {"x": 2}})
        config_nodes.register_config_nodes(store)
        assert sorted(store.repo["toy"]) == ["new.yaml"]
    finally:
        plugins.reset()
        store.repo.pop("toy", None)


def test_import_hfquant_imports_no_torch_and_every_public_name_still_resolves():
    code = ("import sys, hfquant\nassert 'torch' not in sys.modules\n"
            "missing = [n for n in hfquant.__all__ if getattr(hfquant, n, None) is None]\n"
            "import hfquant.quant as q\nmissing += [n for n in q.__all__ if getattr(q, n, None) is None]\n"
            "assert set(hfquant.__all__) <= set(dir(hfquant)), 'dir() lists the lazy names'\nprint(missing)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
