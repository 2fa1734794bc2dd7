"""glibc malloc thresholds (hfquant/allocator.py): set once on Linux/glibc, never over the user's own settings."""

import ctypes.util
import sys

import pytest

import hfquant.allocator as allocator


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return allocator


def _glibc() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


def test_thresholds_are_set_once_where_glibc_runs(fresh, monkeypatch):
    assert fresh.keep_freed_memory() is _glibc()
    monkeypatch.setattr(fresh, "_apply", lambda: pytest.fail("applied twice"))
    assert fresh.keep_freed_memory() is _glibc()  # cached: a sweep's second job does not call mallopt again


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"])
def test_the_users_own_malloc_settings_win(fresh, monkeypatch, name):
    monkeypatch.setenv(name, "glibc.malloc.trim_threshold=0" if name == "GLIBC_TUNABLES" else "131072")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("mallopt called over the user's settings"))
    assert fresh.keep_freed_memory() is False
