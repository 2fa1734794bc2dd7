"""Secrets are never written: values that look like Hub tokens (`hf_` and 20 or more letters or digits) and
values under secret-looking keys (*token*, *auth*, *password*, *secret*, *api_key*, *credential*) are replaced
by `<redacted>` wherever hfquant saves what the user typed: report.json's `config`, report.md, the model card,
a sweep job's failed.json, and Hydra's own `.hydra/*.yaml` and `multirun.yaml` (rewritten by `RedactHydraFiles`
as soon as Hydra has saved them).
"""

from __future__ import annotations

import os
import re
from typing import Any

from hydra.experimental.callback import Callback

REDACTED = "<redacted>"
TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}")
SECRET_KEY = re.compile(r"token|auth|passw|secret|api_?key|credential", re.IGNORECASE)
# `key=value` with a secret-looking key, as in Hydra overrides (`+hub.auth=...`) and `override_dirname`
SECRET_ASSIGNMENT = re.compile(
    r"(?P<key>[\w.+~/-]*(?:token|auth|passw|secret|api_?key|credential)[\w./-]*\s*=\s*)(?P<value>[^\s,'\"\]]+)",
    re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """`text` with Hub tokens and the values of `secret_key=value` assignments replaced."""
    text = TOKEN.sub(REDACTED, text)
    return SECRET_ASSIGNMENT.sub(lambda m: m.group("key") + REDACTED, text)


def redact(obj: Any) -> Any:
    """A copy of a config-like tree (dicts, lists, strings) safe to write: scalar values under secret-looking
    keys and every token-looking string replaced. For configs and overrides; a report's own keys (`tokens`,
    `token_sha256`) are not secrets — use `redact_tokens` there."""
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_key(k) and _scalar(v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return redact_text(obj) if isinstance(obj, str) else obj


def redact_tokens(obj: Any) -> Any:
    """A copy of any JSON-like tree with token-looking strings replaced (keys are kept as they are)."""
    if isinstance(obj, dict):
        return {k: redact_tokens(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tokens(v) for v in obj)
    return TOKEN.sub(REDACTED, obj) if isinstance(obj, str) else obj


def _scalar(value: Any) -> bool:
    return value is not None and value != "" and not isinstance(value, (dict, list, tuple, bool))


def redact_yaml_file(path: str) -> bool:
    """Rewrite a saved YAML file (Hydra's config, overrides, multirun) redacted; True when it changed."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not (TOKEN.search(text) or SECRET_KEY.search(text)):
        return False  # the common case: nothing that could be a secret, file untouched
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    clean = redact(tree)
    if clean == tree:
        return False
    tmp = f"{path}.redacting"
    OmegaConf.save(OmegaConf.create(clean), tmp)
    os.replace(tmp, path)
    return True


class RedactHydraFiles(Callback):
    """Hydra callback: rewrites `.hydra/{config,hydra,overrides}.yaml` (saved just before a job starts) and the
    sweep's `multirun.yaml` without secrets."""

    def on_job_start(self, config, **kwargs) -> None:
        job_dir = str(config.hydra.runtime.output_dir)
        if config.hydra.output_subdir is not None:
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                redact_yaml_file(os.path.join(job_dir, str(config.hydra.output_subdir), name))
        redact_yaml_file(os.path.join(os.path.dirname(job_dir), "multirun.yaml"))  # a sweep's, when there is one

    def on_multirun_end(self, config, **kwargs) -> None:
        redact_yaml_file(os.path.join(str(config.hydra.sweep.dir), "multirun.yaml"))
