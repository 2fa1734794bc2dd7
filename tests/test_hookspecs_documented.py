"""Every hookspec is documented in docs/plugins.md and exercised by a test (datasette's rule)."""

import pathlib

import pytest

from hfquant import hookspecs

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("register_"))


def test_the_hook_list_is_the_designed_one():
    assert HOOKS == [
        "register_backends", "register_configs", "register_datasets",
        "register_evaluators", "register_observers", "register_schemes",
    ]


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
