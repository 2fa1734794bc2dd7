"""The Hydra entry point. Scheme, observer and backend options are generated from the plugin registries, so
a plugin's names work on the command line (`observer=sigma`) with no YAML; `register_configs` adds more."""

from __future__ import annotations

import inspect
import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from .config import ConfigError
from .plugins import get_plugin_manager, registries

log = logging.getLogger("hfquant")


def observer_defaults(cls) -> dict:
    """The constructor's keyword defaults: what `observer.options` starts from."""
    sig = inspect.signature(cls.__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[2:]
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def register_config_nodes(cs: ConfigStore | None = None) -> None:
    """Store a node for every registered scheme, observer and backend, then call `register_configs`."""
    cs = cs or ConfigStore.instance()
    regs = registries()
    for name in regs.schemes.names():
        d = regs.schemes.get(name).to_dict()
        cs.store(group="scheme", name=name, node=d)
    for name in regs.observers.names():
        cs.store(group="observer", name=name, node={"name": name, "options": observer_defaults(regs.observers.get(name))})
    for name in regs.backends.names() + ["auto"]:
        cs.store(group="backend", name=name, node={"name": name})
    get_plugin_manager().hook.register_configs(config_store=cs)


@hydra.main(version_base="1.3", config_path="pkg://hfquant.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from .formats import register_with_transformers
    from .pipeline.push import PushError
    from .pipeline.run import run

    register_with_transformers()
    try:
        run(cfg)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError, PushError) as exc:
        log.error("%s", exc)
        print(f"hfquant: error: {exc}", file=sys.stderr)
        sys.exit(2)


GROUP_KINDS = {"observer": "observers", "scheme": "schemes", "backend": "backends"}


def precheck_group_overrides(argv) -> None:
    """`observer=percentil` → our error (registered names + closest match) instead of Hydra's traceback-y one.
    Sweep values (`scheme=w8a16,w4a16`) are checked one by one."""
    from .registry import UnknownNameError

    for arg in argv:
        key, sep, value = arg.partition("=")
        if "token" in key.lower():
            raise ConfigError(f"{key.lstrip('+~')}: never pass a token on the command line (Hydra saves overrides "
                              "with the run); set HF_TOKEN or run `hf auth login`")
        if not sep or key not in GROUP_KINDS:
            continue
        for name in value.split(","):
            if key == "backend" and name == "auto":
                continue
            try:
                getattr(registries(), GROUP_KINDS[key]).entry(name.strip())
            except UnknownNameError as exc:
                raise ConfigError(f"{key}: {exc}") from None


def hydra_main() -> None:
    try:
        precheck_group_overrides(sys.argv[1:])
    except ConfigError as exc:
        print(f"hfquant: error: {exc}", file=sys.stderr)
        sys.exit(2)
    register_config_nodes()
    _main()
