"""The plugin host: registration, attribution, duplicates, unknown names, allowlist, check_pending, CLI."""

import json
import types
from importlib import metadata

import pytest

import hfquant.plugins as plugins
from hfquant import Observer, PluginError, QuantArgs, QuantScheme, UnknownNameError, hookimpl
from hfquant.plugins_cli import main as plugins_main
from hfquant.registry import Registry


class EchoObserver(Observer):
    """A test observer (behaves like minmax)."""


class ToyBackend:
    pass


class ToyDataset:
    pass


class ToyAlgorithm:
    requires_data, produces_codes = False, True

    def start_layer(self, ctx):
        pass

    def finish_layer(self, ctx):
        pass


class ToyFormat:
    pass


class ToyEvaluator:
    pass


def make_plugin(name="toy", **hooks):
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


@pytest.fixture
def fresh_pm():
    return plugins.make_plugin_manager(load_entry_points=False)


def test_builtins_register_like_any_plugin(fresh_pm):
    regs = plugins.Registries(fresh_pm)
    assert regs.observers.names() == ["minmax", "moving-average", "mse", "percentile"]
    assert {"w8a16", "w4a16", "w4a16-asym", "w8a8", "int8-tensor"} <= set(regs.schemes.names())
    assert regs.observers.entry("mse").plugin == "hfquant.builtin.observers.mse"


def test_every_registration_hook_reaches_its_registry(fresh_pm):
    """One third-party plugin implementing every registration hook; each lands, attributed to it."""
    stored = []

    class FakeStore:
        def store(self, **kw):
            stored.append(kw)

    plugin = make_plugin(
        register_observers=lambda register: register("echo", EchoObserver),
        register_schemes=lambda register: register("toy-scheme", QuantScheme("toy-scheme", weights=QuantArgs())),
        register_backends=lambda register: register("toy-backend", ToyBackend),
        register_algorithms=lambda register: register("toy-algorithm", ToyAlgorithm),
        register_formats=lambda register: register("toy-format", ToyFormat),
        register_datasets=lambda register: register("toy-data", ToyDataset),
        register_evaluators=lambda register: register("toy-eval", ToyEvaluator),
        register_configs=lambda config_store: config_store.store(group="observer", name="echo", node={"name": "echo"}),
    )
    fresh_pm.register(plugin, name="toy")
    fresh_pm.check_pending()
    regs = plugins.Registries(fresh_pm)
    assert regs.observers.get("echo") is EchoObserver
    assert regs.schemes.get("toy-scheme").name == "toy-scheme"
    assert regs.backends.get("toy-backend") is ToyBackend
    assert regs.algorithms.get("toy-algorithm") is ToyAlgorithm and regs.formats.get("toy-format") is ToyFormat
    assert regs.datasets.get("toy-data") is ToyDataset
    assert regs.evaluators.get("toy-eval") is ToyEvaluator
    assert regs.observers.by_plugin("toy") == ["echo"]
    fresh_pm.hook.register_configs(config_store=FakeStore())
    assert stored == [{"group": "observer", "name": "echo", "node": {"name": "echo"}}]
    infos = {i.name: i for i in plugins.plugin_infos(fresh_pm)}
    assert infos["toy"].registered == {
        "observers": ["echo"], "schemes": ["toy-scheme"], "algorithms": ["toy-algorithm"], "formats": ["toy-format"],
        "backends": ["toy-backend"],
        "datasets": ["toy-data"], "evaluators": ["toy-eval"],
    }
    assert "register_configs" in infos["toy"].hooks


def test_duplicate_name_names_both_plugins(fresh_pm):
    fresh_pm.register(make_plugin(register_observers=lambda register: register("minmax", EchoObserver)), name="copycat")
    with pytest.raises(PluginError, match=r"'hfquant.builtin.observers.minmax'.*'copycat'"):
        plugins.Registries(fresh_pm)


def test_bad_names_are_refused(fresh_pm):
    fresh_pm.register(make_plugin(register_observers=lambda register: register("My_Observer", EchoObserver)), name="shouty")
    with pytest.raises(PluginError, match="lower-case-hyphenated"):
        plugins.Registries(fresh_pm)


def test_unknown_name_lists_registered_and_closest():
    with pytest.raises(UnknownNameError) as info:
        plugins.registries().observers.get("percentil")
    msg = str(info.value)
    assert "minmax, moving-average, mse, percentile" in msg and "Did you mean 'percentile'" in msg


def test_misspelled_hook_fails_check_pending():
    pm = plugins.make_plugin_manager(load_entry_points=False)
    pm.register(make_plugin(register_observer=lambda register: None), name="typo")
    with pytest.raises(Exception, match="register_observer"):
        pm.check_pending()


def test_hooks_are_called_once_per_process(monkeypatch):
    plugins.reset()
    calls = []
    pm = plugins.get_plugin_manager()
    pm.register(make_plugin(register_observers=lambda register: calls.append(1)), name="counter")
    for _ in range(3):
        plugins.registries().observers.names()
    assert calls == [1]
    plugins.reset()


class FakeEntryPoint:
    def __init__(self, name, plugin, dist_name="toy-dist"):
        self.name, self._plugin = name, plugin
        self.dist = types.SimpleNamespace(name=dist_name, version="9.9")

    def load(self):
        return self._plugin


@pytest.mark.parametrize("allow, loaded", [(None, True), ("toy-ep", True), ("toy-dist", True), ("other", False), ("", False)])
def test_allowlist_restricts_entry_point_plugins(monkeypatch, allow, loaded):
    plugin = make_plugin(register_observers=lambda register: register("echo", EchoObserver))
    monkeypatch.setattr(metadata, "entry_points", lambda group: [FakeEntryPoint("toy-ep", plugin)] if group == "hfquant" else [])
    if allow is None:
        monkeypatch.delenv(plugins.ALLOWLIST_ENV, raising=False)
    else:
        monkeypatch.setenv(plugins.ALLOWLIST_ENV, allow)
    pm = plugins.make_plugin_manager()
    assert (pm.get_plugin("toy-ep") is not None) is loaded
    assert ("echo" in plugins.Registries(pm).observers) is loaded
    assert "minmax" in plugins.Registries(pm).observers  # built-ins always load


def test_broken_entry_point_names_itself(monkeypatch):
    class Broken(FakeEntryPoint):
        def load(self):
            raise ImportError("no module named gptq_kernels")

    monkeypatch.setattr(metadata, "entry_points", lambda group: [Broken("hfquant-gptq", None)])
    monkeypatch.delenv(plugins.ALLOWLIST_ENV, raising=False)
    with pytest.raises(PluginError, match="'hfquant-gptq'.*gptq_kernels"):
        plugins.make_plugin_manager()


def test_plugins_cli_text_and_json(capsys):
    plugins.reset()
    assert plugins_main([]) == 0
    out = capsys.readouterr().out
    assert "hfquant.builtin.observers.mse" in out and "observers: mse" in out
    assert plugins_main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in data}
    assert by_name["hfquant.builtin.schemes"]["registered"]["schemes"][0] == "int8-tensor"
    assert all(d["version"] for d in data if d["builtin"])


def test_registry_iteration_and_membership():
    reg = Registry("observers")
    reg.add("a", 1, "p")
    assert "a" in reg and list(reg) == ["a"] and len(reg) == 1
