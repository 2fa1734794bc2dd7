"""The config nodes the command line composes from: one per registered scheme, observer, algorithm, format and
backend, plus whatever plugins store with `register_configs`.

Making them loads every plugin, and with the plugins torch (2–3 s of a 2-core machine's start-up). So the CLI saves
a copy in the cache each time it makes them, and `hfquant --help` reads that copy instead of loading the plugins;
a run composes its jobs against the copy first, to refuse a misspelled key at once. The copy is keyed by what the
installed code is and where it runs: this Python environment, hfquant's own modules and config files, each
installed plugin's name, version and top-level package files (sizes and modification times), the plugin allowlist,
the modification times of the folders on `sys.path` (any install or uninstall changes one), and the host name (a
plugin may register a GPU backend only where there is a GPU; a cache in a shared home folder serves several
machines). Registrations that depend on anything else (environment variables, the date) break the contract in
docs/plugins.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import socket
import sys
from importlib import metadata
from typing import Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigNode, ConfigStore
from omegaconf import OmegaConf

from .auto_algorithm import AUTO
from .cache import cache_root
from .config import backend_weight_bits
from .pipeline.output import write_atomic
from .plugins import ALLOWLIST_ENV, ENTRY_POINT_GROUP, get_plugin_manager, registries
from .registry import PluginError

log = logging.getLogger("hfquant")
FORMAT_VERSION = 2  # of the saved copy: bump when its layout changes (2: the backends' weight bit widths)
KEEP_COPIES = 8  # one per environment / plugin set recently used; older ones are deleted
OWN_PACKAGES = ("hfquant", "hfquant_builtins")  # hfquant.conf (the YAML files) is found through hfquant's spec


def constructor_defaults(cls) -> dict:
    """The constructor's keyword defaults (after `self` and an observer's `args`): what a plugin's options in the
    config start from."""
    sig = inspect.signature(cls.__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.name not in ("self", "args")
            and p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def register_config_nodes(cs: Optional[ConfigStore] = None, save: bool = False, key: Optional[str] = None) -> None:
    """Store a node for every registered scheme, observer, algorithm and backend, then call `register_configs`;
    `save` (the CLI): keep a copy for `hfquant --help` if this installation has none yet, under `key`
    (`installation_key()`, taken before any plugin loads). Nodes a saved copy stored earlier in this process are
    removed first, so only what the plugins register now remains."""
    cs = cs or ConfigStore.instance()
    fingerprint = (key or installation_key()) if save else None
    for key in _LOADED_FROM_COPY:
        _remove(cs, key)
    _LOADED_FROM_COPY.clear()
    before = _entries(cs)
    regs = registries()
    for name in regs.schemes.names():
        d = regs.schemes.get(name).to_dict()
        d.setdefault("embedding", None)  # settable on the command line: scheme.embedding=int8
        cs.store(group="scheme", name=name, node=d)
    for name in regs.observers.names():
        cs.store(group="observer", name=name, node={"name": name, "options": constructor_defaults(regs.observers.get(name))})
    for name in regs.algorithms.names():
        cs.store(group="algorithm", name=name, node={name: constructor_defaults(regs.algorithms.get(name))})
    if AUTO in regs.algorithms.names():
        raise PluginError(f"algorithm name {AUTO!r} is reserved (algorithm=auto picks a recipe); rename the plugin's "
                          f"algorithm registered by {regs.algorithms.entry(AUTO).plugin}")
    cs.store(group="algorithm", name=AUTO, node={AUTO: {}})  # the recipe chosen for the scheme (auto_algorithm.py)
    for name in regs.formats.names():
        cs.store(group="format", name=name, node={"name": name, **constructor_defaults(regs.formats.get(name))})
    cs.store(group="format", name="auto", node={"name": "auto"})
    for name in regs.backends.names() + ["auto"]:
        cs.store(group="backend", name=name, node={"name": name})
    get_plugin_manager().hook.register_configs(config_store=cs)
    if fingerprint:
        _save_copy(fingerprint, [node for key, node in _entries(cs).items() if before.get(key) is not node],
                   backend_weight_bits())


_LOADED_FROM_COPY: List[Tuple[str, ...]] = []  # store keys the saved copy filled in this process
_SAVED_WEIGHT_BITS: Dict[str, Optional[List[int]]] = {}  # what the saved copy read in this process said


def saved_weight_bits() -> Dict[str, Optional[List[int]]]:
    """The backends' weight bit widths as the saved copy read by `register_saved_config_nodes` recorded them (empty
    when none was read): enough to refuse a width no backend runs before the plugins, and torch, load."""
    return dict(_SAVED_WEIGHT_BITS)


def register_saved_config_nodes(cs: Optional[ConfigStore] = None, key: Optional[str] = None) -> bool:
    """Store the nodes saved by an earlier invocation in this same installation (`key`, else computed), without
    loading any plugin; False (nothing stored) when there is no such copy."""
    path = _copy_path(key or installation_key())
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        nodes = [(n["name"], OmegaConf.create(n["yaml"]), n["group"], n["package"], n["provider"]) for n in saved["nodes"]]
        weight_bits = {str(k): None if v is None else [int(b) for b in v] for k, v in saved["weight_bits"].items()}
    except FileNotFoundError:
        return False
    except PermissionError as exc:  # another user's cache: use the plugins, leave their file alone
        log.debug("cannot read the saved config nodes %s: %s", path, exc)
        return False
    except Exception as exc:  # damaged (or a value YAML cannot read back): made again, and saved, from the plugins
        log.debug("ignoring the saved config nodes %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return False
    cs = cs or ConfigStore.instance()
    for name, node, group, package, provider in nodes:
        cs.store(name=name, node=node, group=group, package=package, provider=provider)
        _LOADED_FROM_COPY.append(tuple((group.split("/") if group else [])) + (_yaml_name(name),))
    _SAVED_WEIGHT_BITS.clear()
    _SAVED_WEIGHT_BITS.update(weight_bits)
    return True


def _yaml_name(name: str) -> str:
    return name if name.endswith(".yaml") else f"{name}.yaml"


def _remove(cs: ConfigStore, key: Tuple[str, ...]) -> None:
    tree = cs.repo
    for part in key[:-1]:
        tree = tree.get(part, {})
    tree.pop(key[-1], None)


def _entries(cs: ConfigStore) -> Dict[Tuple[str, ...], ConfigNode]:
    """Every node in the store by its path (group folders, then the file name)."""
    found: Dict[Tuple[str, ...], ConfigNode] = {}

    def walk(tree: dict, path: Tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, path + (key,))
            else:
                found[path + (key,)] = value

    walk(cs.repo, ())
    return found


def _save_copy(fingerprint: str, nodes: List[ConfigNode], weight_bits: Dict[str, Optional[List[int]]]) -> None:
    """Best effort (a read-only cache only costs the next `--help` its speed); written whole or not at all, and not
    at all when a node would not read back the same (a value YAML cannot carry, e.g. a `Path`)."""
    path = _copy_path(fingerprint)
    if os.path.exists(path):
        return
    try:
        entries = [{"name": n.name, "group": n.group, "package": n.package, "provider": n.provider,
                    "yaml": OmegaConf.to_yaml(n.node)} for n in nodes]
        for entry, node in zip(entries, nodes):
            if OmegaConf.to_container(OmegaConf.create(entry["yaml"])) != OmegaConf.to_container(node.node):
                raise ValueError(f"{entry['group']}/{entry['name']} does not read back the same")
    except Exception as exc:
        log.debug("not saving the config nodes for --help: %s", exc)
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps({"format": FORMAT_VERSION, "nodes": entries, "weight_bits": weight_bits}))
        _prune(os.path.dirname(path))
    except OSError as exc:
        log.debug("could not save the config nodes for --help in %s: %s", path, exc)


def _prune(folder: str) -> None:
    """The newest KEEP_COPIES copies stay (another process may be pruning too: a file already gone is fine)."""
    copies = []
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            if entry.name.endswith(".json"):
                copies.append((entry.stat().st_mtime, entry.path))
    for _, old in sorted(copies)[:-KEEP_COPIES]:
        with contextlib.suppress(OSError):
            os.unlink(old)


def _copy_path(fingerprint: str) -> str:
    return os.path.join(cache_root(), "config-nodes", f"{fingerprint}.json")


def installation_key() -> str:
    """What the nodes depend on, hashed: finding the modules' files does not import them (nor torch)."""
    h = hashlib.sha256(repr((FORMAT_VERSION, socket.gethostname(), sys.prefix, sys.version,
                             os.environ.get(ALLOWLIST_ENV))).encode())
    here = os.path.realpath(os.getcwd())
    for folder in sys.path:  # an install or uninstall (a plugin's optional dependency, say) touches its folder
        if folder and os.path.realpath(folder) != here:  # not the working folder (`python -m`), which runs write to
            with contextlib.suppress(OSError):
                h.update(f"{folder}:{os.stat(folder).st_mtime_ns}\n".encode())
    for name in OWN_PACKAGES + ("hfquant.conf",):
        _hash_sources(h, name)
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = ep.dist
        h.update(repr((ep.name, ep.value, dist and dist.name, dist and dist.version)).encode())
        _hash_sources(h, ep.value.split(":")[0].split(".")[0])
    return h.hexdigest()[:24]


def _hash_sources(h, module: str) -> None:
    """Each .py / .yaml file of `module` (a package: all of it) by path, size and modification time."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        h.update(f"{module}: {exc}".encode())
        return
    if spec is None:
        h.update(f"{module}: missing".encode())
        return
    roots = list(spec.submodule_search_locations or []) or [spec.origin or ""]
    for root in roots:
        for path in _source_files(root):
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())


def _source_files(root: str) -> List[str]:
    if os.path.isfile(root):
        return [root]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith((".py", ".yaml"))]
    return found
