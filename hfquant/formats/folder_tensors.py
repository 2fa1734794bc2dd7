"""Read a saved folder's tensors by name across its shards, one quantized module at a time (the exporters' source)."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch


class FolderTensors:
    """Tensors of a saved folder by name, across its shards (a module's tensors may sit in two shards), grouped by
    module: one quantized module's tensors at a time, so memory stays one module plus one shard's mapping."""

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.where = json.load(f)["weight_map"]
        else:
            with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        self.shards = sorted(set(self.where.values()))
        self._open = {s: safe_open(os.path.join(folder, s), "pt") for s in self.shards}
        self.metadata = json.load(open(index, encoding="utf-8")).get("metadata", {}) if os.path.isfile(index) else {}

    def get(self, key: str) -> torch.Tensor:
        return self._open[self.where[key]].get_tensor(key)

    def items(self, modules) -> Iterable[Tuple[str, Optional[Dict[str, str]], str]]:
        """(name, {leaf: key} for a quantized module or None, shard of its first tensor), in shard then key order."""
        grouped: Dict[str, Dict[str, str]] = {}
        order: List[str] = []
        for key in sorted(self.where, key=lambda k: (self.where[k], k)):
            module, _, leaf = key.rpartition(".")
            if module in modules:
                if module not in grouped:
                    grouped[module] = {}
                    order.append(module)
                grouped[module][leaf] = key
            else:
                order.append(key)
        for name in order:
            keys = grouped.get(name)
            yield name, keys, self.where[next(iter(keys.values()))] if keys else self.where[name]
