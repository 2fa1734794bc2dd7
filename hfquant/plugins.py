"""The plugin host: built-ins and entry-point plugins registered the same way, then collected into registries.

Modelled on simonw/llm's `plugins.py`: built-in plugin modules are listed here and registered exactly like
third-party ones; third-party plugins come from the entry-point group ``hfquant``. ``HFQUANT_LOAD_PLUGINS``
(a comma list of entry-point or distribution names; empty string = none) restricts which third-party
plugins load. Hooks run once per process; the results are cached in `Registries`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Dict, List, Optional

import pluggy

from . import hookspecs
from .registry import PluginError, Registry

ENTRY_POINT_GROUP = "hfquant"
ALLOWLIST_ENV = "HFQUANT_LOAD_PLUGINS"
KINDS = ("observers", "schemes", "backends", "datasets", "evaluators")

BUILTIN_MODULES = (
    "hfquant_builtins.observers.minmax",
    "hfquant_builtins.observers.moving_average",
    "hfquant_builtins.observers.percentile",
    "hfquant_builtins.observers.mse",
    "hfquant_builtins.schemes",
    "hfquant_builtins.datasets.pydoc",
    "hfquant_builtins.datasets.text",
    "hfquant_builtins.datasets.hub",
    "hfquant_builtins.evaluators.perplexity",
    "hfquant_builtins.evaluators.embedding_similarity",
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


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowlist()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else None
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"plugin {ep.name!r} (from {dist_name or 'unknown distribution'}) failed to import: {exc}"
            ) from exc
        pm.register(plugin, name=ep.name)
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
