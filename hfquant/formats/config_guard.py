"""Make plain transformers refuse an hfquant folder loudly instead of loading it silently with every quantized
Linear randomly initialised (what an unknown `quant_method` gets: one warning, then fluent-looking garbage).

transformers reads `model_type` before anything else and fails on an unknown one with an error that quotes it,
so the folder's config.json names a model type that says what is needed (`GUARD_MODEL_TYPE`); the real one is
kept in `quantization_config.base_model_type`. `import hfquant` registers `GUARD_MODEL_TYPE` with AutoConfig as
a router to the real config class, so the folder loads as before wherever hfquant is installed. Folders written
before this (format_version 1) keep their real model_type and still load with hfquant. A loaded hfquant model's
config has its real class (transformers needs it), so `import hfquant` also guards every config.json written
for a config that carries hfquant's quantization_config: a re-saved or re-pushed model stays guarded.
"""

from __future__ import annotations

import json
import os

# Only what configuration_auto itself imports: `import hfquant` registers this right after that module loads
# (hfquant/import_hooks.py), possibly while the rest of transformers.models.auto is still importing.
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

GUARD_MODEL_TYPE = "hfquant (this folder needs hfquant: pip install hfquant, then import hfquant before from_pretrained)"


def guard_config_json(folder: str, name: str = "config.json") -> None:
    """Rewrite `folder/config.json` (as transformers writes it: indent 2, sorted keys) with the guard model type."""
    path = os.path.join(folder, name)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") == GUARD_MODEL_TYPE:
        return
    config["quantization_config"]["base_model_type"] = config["model_type"]
    config["model_type"] = GUARD_MODEL_TYPE
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


class HfquantGuardedConfig(PreTrainedConfig):
    """Never instantiated: `from_dict` hands an hfquant folder's config to its real model type's class."""

    model_type = GUARD_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        base = (config_dict.get("quantization_config") or {}).get("base_model_type")
        if not base:
            raise ValueError("this hfquant config.json has no quantization_config.base_model_type; it was edited — "
                             "restore it from the run that wrote the folder")
        return CONFIG_MAPPING[base].from_dict(dict(config_dict, model_type=base), **kwargs)


def _carries_hfquant(config) -> bool:
    q = getattr(config, "quantization_config", None)
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) == "hfquant"


def _guarded_to_json_file(original):
    def to_json_file(self, json_file_path, use_diff: bool = True):
        original(self, json_file_path, use_diff)
        if _carries_hfquant(self):
            guard_config_json(os.path.dirname(os.path.abspath(json_file_path)), os.path.basename(json_file_path))

    to_json_file.hfquant_guard = True
    return to_json_file


def register_guarded_config() -> None:
    """Idempotent."""
    if GUARD_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(GUARD_MODEL_TYPE, HfquantGuardedConfig)
    if not getattr(PreTrainedConfig.to_json_file, "hfquant_guard", False):
        PreTrainedConfig.to_json_file = _guarded_to_json_file(PreTrainedConfig.to_json_file)


register_guarded_config()  # importing this module is what registers it (hfquant/__init__.py)
