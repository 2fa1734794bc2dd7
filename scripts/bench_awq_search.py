#!/usr/bin/env python
"""AWQ's α search, coarse to fine against the full grid, side by side in one process: during one default run
(`[awq, gptq]` on the embedded model, evaluation off) every group is searched both ways — alternating which goes
first, on the same statistics — and the run continues with the default's choice. Reports both searches' seconds
summed over the groups and how many groups picked the same α.

    .venv/bin/python scripts/bench_awq_search.py [--out docs/results/bench_awq_search.json] [hydra overrides ...]

Why in one process: the whole quantize stage drifts by more than the saving between separate runs on a shared VM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            return sorted({w for line in f if line.startswith("flags") for w in line.split() if w in ("avx512_bf16", "amx_tile", "avx2", "avx512f")})
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_awq_search.json"))
    args, overrides = parser.parse_known_args()

    import hfquant_builtins.algorithms.awq as awq
    from hfquant.pipeline.run import run
    from tests.conftest import compose

    seconds = {"full": 0.0, "coarse_to_fine": 0.0}
    groups = {"searched": 0, "same_alpha": 0}
    search = awq.search

    def both(group, mean_abs, rows, ctx, grid, full=False):
        results = {}
        for mode in (("full", "coarse_to_fine") if groups["searched"] % 2 == 0 else ("coarse_to_fine", "full")):
            start = time.perf_counter()
            results[mode] = search(group, mean_abs, rows, ctx, grid, mode == "full")
            seconds[mode] += time.perf_counter() - start
        groups["searched"] += 1
        groups["same_alpha"] += results["full"][0] == results["coarse_to_fine"][0]
        return results["full" if full else "coarse_to_fine"]

    awq.search = both
    with tempfile.TemporaryDirectory() as tmp:
        run(compose([f"output_dir={os.path.join(tmp, 'out')}", "evaluation=none", "pipeline=in_memory",
                     "algorithm=[awq,gptq]", *overrides]))
    result = {"seconds": seconds, "ratio": seconds["coarse_to_fine"] / seconds["full"], **groups,
              "overrides": overrides, "cpu_flags": cpu_flags(), "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
