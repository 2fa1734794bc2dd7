"""Logits of an exported folder as its consumer computes them, in a child process where `import hfquant` fails —
what a user without hfquant runs (the export check of both compressed-tensors and GGUF)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

CHILD = """
import sys, torch
sys.modules["hfquant"] = None  # this process must not be able to import hfquant
from transformers import AutoModelForCausalLM
folder, ids_path, out_path, load = sys.argv[1:5]
exec(load)  # defines `kwargs` for from_pretrained
model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_path)).logits[0].float(), out_path)
"""


def logits_in_clean_process(folder: str, input_ids: torch.Tensor, workdir: str, load_kwargs: str) -> torch.Tensor:
    """`load_kwargs`: Python source run in the child that sets `kwargs` for `from_pretrained` (e.g. a `gguf_file=` or
    a `quantization_config=`). Raises with the child's error output when it cannot load or run the folder."""
    ids_path, out_path = os.path.join(workdir, "ids.pt"), os.path.join(workdir, "logits.pt")
    torch.save(input_ids.cpu(), ids_path)
    done = subprocess.run([sys.executable, "-c", CHILD, folder, ids_path, out_path, load_kwargs],
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"transformers could not load or run {folder} without hfquant:\n{done.stderr[-2000:]}")
    return torch.load(out_path)
