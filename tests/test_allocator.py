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


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def _advised_huge(tensor) -> bool:
    """Whether the mapping that holds `tensor`'s middle byte carries MADV_HUGEPAGE (`hg` in its VmFlags, from
    /proc/self/smaps; the advice splits the mapping: its unaligned head and tail are mappings of their own). The
    advice, not the pages: whether the kernel finds free 2 MiB blocks depends on the machine's memory at the time."""
    address, inside = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields[0].split("-")) == 2 and not fields[0].endswith(":"):
                try:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                except ValueError:
                    continue
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return "hg" in fields[1:]
    return False


@pytest.mark.skipif(not _glibc() or _thp_mode() not in ("madvise", "always"),
                    reason="transparent huge pages off or absent: the kernel takes no such advice")
def test_large_fresh_buffers_are_advised_for_huge_pages(fresh):
    import torch

    assert fresh.keep_freed_memory()
    size = 64 * 2**20
    advised = fresh.advise_huge_pages(torch.empty(size, dtype=torch.uint8))
    plain = torch.empty(size, dtype=torch.uint8)
    assert _advised_huge(advised) and not _advised_huge(plain)


def test_small_or_non_cpu_buffers_and_other_allocators_are_left_alone(fresh, monkeypatch):
    import torch

    monkeypatch.setattr(fresh, "_madvise", lambda: pytest.fail("advised"))
    fresh._applied = True
    for tensor in (torch.empty(1024, dtype=torch.uint8), torch.empty(64 * 2**20, dtype=torch.uint8, device="meta")):
        assert fresh.advise_huge_pages(tensor) is tensor
    fresh._applied = False  # the user's malloc settings, or not glibc: a large block may be reused heap memory
    large = torch.empty(64 * 2**20, dtype=torch.uint8)
    assert fresh.advise_huge_pages(large) is large
