"""Run a function right after a module is first imported — how `import hfquant` registers its format with
transformers without importing transformers itself (~1.5 s of a 2-core machine's time, and `import hfquant`
is on every CLI call).

A callback runs at once when its module is already imported; otherwise a meta-path finder wraps that module's
loader so the callback runs when the module has finished executing, before the importer sees it.
"""

from __future__ import annotations

import sys
import threading
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
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        callbacks = self.callbacks.pop(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            for callback in callbacks:
                callback()

        spec.loader.exec_module = exec_then_call  # loaders are made per spec, so this touches no other module
        if not self.callbacks:
            _remove_finder()
        return spec


_finder = _AfterImportFinder()


def _remove_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def after_import(module_name: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once `module_name` is imported: now if it already is, else right after its import."""
    with _lock:
        if module_name in sys.modules:
            callback()
            return
        _finder.callbacks.setdefault(module_name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def import_registering(module_name: str) -> Callable[[], None]:
    """A callback importing a module that registers itself at its end. When that module is the importer
    (mid-import, partially initialised), importing it again would fail; its own last line registers."""

    def callback() -> None:
        module = sys.modules.get(module_name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return
        import_module(module_name)

    return callback
