"""Package attributes imported on first use (PEP 562): the public API names stay where users expect them
(`from hfquant import QuantArgs`), while `import hfquant` and `hfquant --help` import no torch (2–3 s on a
2-core machine) until a name that needs it is used."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """`(__getattr__, __dir__)` for `package`; `exports` maps each public name to the submodule (relative, e.g.
    ".algorithm") that defines it. A name is looked up once, then kept as an ordinary module attribute."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
