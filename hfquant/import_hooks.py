"""Run a function right after a module is first imported — how `import hfquant` registers its format with
transformers without importing transformers itself (~1.5 s of a 2-core machine's time, and `import hfquant`
is on every CLI call).

A callback runs at once when its module is already imported; otherwise a meta-path finder wraps that module's
loader so the callback runs when the module has finished executing, before the importer sees it. The callbacks
are taken (and the finder removed) only then: a spec that is looked up but never executed (`importlib.util.find_spec`
from an IDE or a plugin scanner) leaves them in place. A failing callback becomes a warning, never a failed import
of the library it watches.
"""

from __future__ import annotations

import sys
import threading
import warnings
from importlib import import_module
from importlib.abc import MetaPathFinder
from typing import Callable, Dict, List

_lock = threading.RLock()


class _AfterImportFinder(MetaPathFinder):
    """Finds nothing itself: asks the finders behind it, then wraps the loader of a watched module."""

    def __init__(self) -> None:
        self.callbacks: Dict[str, List[Callable[[], None]]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            with _lock:
                callbacks = self.callbacks.pop(fullname, [])
                if not self.callbacks:
                    _remove_finder()
            for callback in callbacks:
                _call(callback, fullname)

        spec.loader.exec_module = exec_then_call  # loaders are made per spec, so this touches no other module
        return spec


_finder = _AfterImportFinder()


def _remove_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path = [f for f in sys.meta_path if f is not _finder]  # a new list: others may be iterating the old


def _call(callback: Callable[[], None], module_name: str) -> None:
    try:
        callback()
    except Exception as exc:  # the watched library must still import
        warnings.warn(f"hfquant could not register with {module_name} ({type(exc).__name__}: {exc}); hfquant folders "
                      "will not load through transformers in this process — please report it", RuntimeWarning,
                      stacklevel=2)


def after_import(module_name: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once `module_name` is imported: now if it already is, else right after its import."""
    with _lock:
        if module_name not in sys.modules:
            _finder.callbacks.setdefault(module_name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path = [_finder, *sys.meta_path]
            return
    _call(callback, module_name)


def import_registering(module_name: str) -> Callable[[], None]:
    """A callback importing a module that registers itself at its end. When that module is the importer
    (mid-import, partially initialised), importing it again would fail; its own last line registers."""

    def callback() -> None:
        module = sys.modules.get(module_name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return
        import_module(module_name)

    return callback
