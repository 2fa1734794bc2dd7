"""hfquant's on-disk format: `QuantLinear` modules in a save_pretrained folder, registered with transformers.

Names resolve on first use (PEP 562), so importing one submodule (config_guard, while transformers is still
importing) does not import the others.
"""

from importlib import import_module

_SOURCES = {
    "QuantLinear": ".qlinear",
    "FORMAT_VERSION": ".transformers_integration",
    "HfQuantConfig": ".transformers_integration",
    "register_with_transformers": ".transformers_integration",
    "replace_linears": ".transformers_integration",
}

__all__ = sorted(_SOURCES)


def __getattr__(name):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_SOURCES[name], __name__), name)
