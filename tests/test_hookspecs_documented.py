"""Every hookspec is documented in docs/plugins.md and exercised by a test (datasette's rule)."""

import pathlib

import pytest

from hfquant.plugins import make_plugin_manager

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The hookspecs the plugin manager really has (not a list kept by hand), as datasette's test walks them.
HOOKS = sorted(name for name, caller in vars(make_plugin_manager(load_entry_points=False).hook).items()
               if getattr(caller, "spec", None) is not None)


def test_the_designed_hooks_are_all_there():
    assert {"register_observers", "register_schemes", "register_algorithms", "register_formats", "register_backends",
            "register_datasets", "register_evaluators", "register_configs"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_has_a_docstring(hook):
    spec = getattr(make_plugin_manager(load_entry_points=False).hook, hook).spec
    assert (spec.function.__doc__ or "").strip(), f"hookspec {hook} has no docstring"


def test_every_documented_hook_is_real():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    documented = {line[4:].split("(", 1)[0] for line in doc.splitlines() if line.startswith("### register_")}
    assert documented == set(HOOKS), f"docs/plugins.md documents {sorted(documented ^ set(HOOKS))} differently"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_signature_and_example(hook):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    section = doc.split(f"### {hook}(", 1)
    assert len(section) == 2, f"docs/plugins.md has no '### {hook}(...)' section"
    body = section[1].split("\n### ", 1)[0]
    assert "Contract" in body and f"def {hook}(" in body, f"{hook} needs a contract and a minimal example"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    tests = [p for p in (ROOT / "tests").rglob("test_*.py") if p.name != pathlib.Path(__file__).name]
    assert any(f"{hook}=" in p.read_text() or f"def {hook}(" in p.read_text() for p in tests), (
        f"no test implements {hook}"
    )
