"""Samples the model-written calibration windows of a run's config and writes them where hfquant ships them.

    .venv/bin/python scripts/ship_generated_windows.py [hydra overrides...]   # default: the embedded model

Runs the same sampling as `hfquant` (pipeline/generated.py: the config's calibration windows pick the first tokens,
then `generate_windows`), never reading a cache or an already shipped file, and writes
`hfquant/data/generated-<model>-seed<seed>-<count>x<seq_len>.safetensors` with the model's weight files (names,
sizes, sha256), the request and the tokens' hash. A run then uses those windows only for exactly those weights and
that request (pipeline/shipped_windows.py). Refuses to overwrite an existing file unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for hfquant (default: the embedded model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shipped file")
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from hfquant.config import validate
    from hfquant.config_nodes import register_config_nodes
    from hfquant.pipeline.generated import RECIPE, calibration_request, generate_windows
    from hfquant.pipeline.load import load_model
    from hfquant.pipeline.shipped_windows import SHIPPED_DIR, write_shipped

    register_config_nodes()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hfquant.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["output_dir=/nonexistent/unused", *args.overrides])
    spec = validate(cfg)
    calibration = spec.calibration
    if calibration is None or not calibration.generated:
        sys.exit("this config samples no calibration windows (calibration.generated is 0 or calibration=none)")
    model = spec.model
    if model.get("dtype") != "float32" or spec.device not in ("cpu", "auto"):
        sys.exit(f"shipped windows are sampled in float32 on the CPU (where runs use them); this config has "
                 f"model.dtype={model.get('dtype')} device={spec.device}")
    name = f"{(model.get('name') or os.path.basename(model['path'])).lower()}-seed{calibration.seed}-" \
           f"{calibration.generated}x{calibration.seq_len}"
    out = os.path.join(SHIPPED_DIR, f"generated-{name}.safetensors")
    if os.path.exists(out) and not args.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it")
    loaded = load_model(model["path"], gguf_file=model.get("gguf_file"), dtype="float32",
                        trust_remote_code=bool(model.get("trust_remote_code")), revision=model.get("revision"))
    if loaded.model.dtype != torch.float32:
        sys.exit(f"shipped windows are sampled in float32; this model loaded as {loaded.model.dtype}")
    windows, first_tokens = calibration_request(spec, loaded.tokenizer)
    start = time.perf_counter()
    sampled = generate_windows(loaded.model.eval(), calibration.generated, windows.input_ids.shape[1], calibration.seed,
                               first_tokens)
    os.makedirs(SHIPPED_DIR, exist_ok=True)
    meta = write_shipped(out, sampled, loaded.source, calibration.seed, first_tokens, RECIPE)
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s of sampling); tokens sha256 {meta['token_sha256'][:16]}, "
          f"model files {meta['model_files']}")


if __name__ == "__main__":
    main()
