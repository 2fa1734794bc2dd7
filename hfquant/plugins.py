"""The plugin host: built-ins and entry-point plugins registered the same way, then collected into registries.

Modelled on simonw/llm's `plugins.py`: built-in plugin modules are listed here and registered exactly like
third-party ones; third-party plugins come from the entry-point group ``hfquant``. ``HFQUANT_LOAD_PLUGINS``
(a comma list of entry-point or distribution names; empty string = none) restricts which third-party
plugins load (a name there that no installed plugin has is warned about, once). Hooks run once per process;
the results are cached in `Registries`. A plugin that fails to import or to register raises `PluginError`
naming it and the way out.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Dict, List, Optional

import pluggy

from . import hookspecs
from .registry import PluginError, Registry

ENTRY_POINT_GROUP = "hfquant"
ALLOWLIST_ENV = "HFQUANT_LOAD_PLUGINS"
log = logging.getLogger("hfquant")
KINDS = ("observers", "schemes", "algorithms", "formats", "backends", "datasets", "evaluators")

BUILTIN_MODULES = (
    "hfquant_builtins.observers.minmax",
    "hfquant_builtins.observers.moving_average",
    "hfquant_builtins.observers.percentile",
    "hfquant_builtins.observers.mse",
    "hfquant_builtins.schemes",
    "hfquant_builtins.algorithms.rtn",
    "hfquant_builtins.algorithms.gptq",
    "hfquant_builtins.algorithms.awq",
    "hfquant_builtins.algorithms.smoothquant",
    "hfquant_builtins.algorithms.hqq",
    "hfquant_builtins.algorithms.signround",
    "hfquant_builtins.datasets.pydoc",
    "hfquant_builtins.datasets.text",
    "hfquant_builtins.datasets.hub",
    "hfquant_builtins.datasets.random_tokens",
    "hfquant_builtins.datasets.prose",
    "hfquant_builtins.evaluators.perplexity",
    "hfquant_builtins.evaluators.embedding_similarity",
    "hfquant_builtins.formats.hfquant_format",
    "hfquant_builtins.formats.bitsandbytes_format",
    "hfquant_builtins.formats.compressed_tensors_format",
    "hfquant_builtins.formats.gguf_format",
    "hfquant_builtins.backends.fake",
    "hfquant_builtins.backends.cpu",
    "hfquant_builtins.backends.bitsandbytes",
)


@dataclass
class PluginInfo:
    """What `hfquant plugins` shows for one plugin."""

    name: str
    version: Optional[str]
    builtin: bool
    hooks: List[str]
    registered: Dict[str, List[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "registered": self.registered,
        }


class Registries:
    """All registries, filled by calling every plugin's registration hooks once."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.tables: Dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        for kind in KINDS:
            hook = getattr(pm.hook, f"register_{kind}")
            # Call each implementation separately so every registered name is attributed to its plugin.
            for impl in hook.get_hookimpls():
                impl.function(register=self.tables[kind].register_for(impl.plugin_name))

    def __getattr__(self, kind: str) -> Registry:
        tables = self.__dict__.get("tables", {})
        if kind in tables:
            return tables[kind]
        raise AttributeError(kind)


# plugin name -> (distribution name, version) for entry-point plugins, for `hfquant plugins`.
_DISTS: Dict[str, tuple] = {}


def _allowlist() -> Optional[set]:
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


_WARNED: set = set()  # allowlisted names already warned about (once per process)


def _warn_not_installed(allowed: set, installed: Dict[str, Optional[str]]) -> None:
    """`HFQUANT_LOAD_PLUGINS=hfquant-sigma` with no such plugin installed would silently load nothing: say so."""
    known = set(installed) | {d for d in installed.values() if d}
    missing = sorted(allowed - known - _WARNED)
    if not missing:
        return
    _WARNED.update(missing)
    names = ", ".join(f"{ep} (from {dist})" if dist and dist != ep else ep for ep, dist in sorted(installed.items()))
    log.warning("%s names %s, but no such plugin is installed (installed plugins: %s); check the spelling or "
                "pip install it", ALLOWLIST_ENV, ", ".join(repr(m) for m in missing), names or "none")


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowlist()
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    if allowed:
        _warn_not_installed(allowed, {ep.name: ep.dist.name if ep.dist is not None else None for ep in entry_points})
    for ep in entry_points:
        dist_name = ep.dist.name if ep.dist is not None else None
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        origin = f"plugin {ep.name!r} (from {dist_name or 'unknown distribution'})"
        way_out = (f"uninstall it (pip uninstall {dist_name or ep.name}) or load only the plugins you want with "
                   f"{ALLOWLIST_ENV}=<names> ({ALLOWLIST_ENV}= loads none)")
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(f"{origin} failed to import: {type(exc).__name__}: {exc}; {way_out}") from exc
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as exc:  # a hook implementation that does not match its spec
            raise PluginError(f"{origin} does not fit hfquant's hooks: {exc}; {way_out}") from exc
        _DISTS[ep.name] = (dist_name, ep.dist.version if ep.dist is not None else None)


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager: hookspecs, built-ins, then (optionally) entry-point plugins; `check_pending` last."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name.replace("hfquant_builtins.", "hfquant.builtin."))
    if load_entry_points:
        _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} — hfquant hooks are: {', '.join(_hook_names())}") from exc
    return pm


def _hook_names() -> List[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("register_"))


_PM: Optional[pluggy.PluginManager] = None
_REGISTRIES: Optional[Registries] = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (created on first use)."""
    global _PM
    if _PM is None:
        _PM = make_plugin_manager()
    return _PM


def registries() -> Registries:
    """The process-wide registries (each registration hook called exactly once)."""
    global _REGISTRIES
    if _REGISTRIES is None:
        _REGISTRIES = Registries(get_plugin_manager())
    return _REGISTRIES


def reset() -> None:
    """Forget the cached manager and registries (tests, or after installing a plugin in-process)."""
    global _PM, _REGISTRIES
    _PM = None
    _REGISTRIES = None


def plugin_infos(pm: Optional[pluggy.PluginManager] = None) -> List[PluginInfo]:
    """Every loaded plugin with its version and what it registered, built-ins first."""
    pm = pm or get_plugin_manager()
    regs = registries() if pm is _PM else Registries(pm)
    versions = {name: version for name, (_, version) in _DISTS.items()}
    try:
        own_version = metadata.version("hfquant")
    except metadata.PackageNotFoundError:
        own_version = None
    infos = []
    for name, plugin in pm.list_name_plugin():
        builtin = name.startswith("hfquant.builtin.")
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        registered = {k: regs.tables[k].by_plugin(name) for k in KINDS if regs.tables[k].by_plugin(name)}
        infos.append(PluginInfo(name, own_version if builtin else versions.get(name), builtin, hooks, registered))
    return sorted(infos, key=lambda i: (not i.builtin, i.name))
