#!/usr/bin/env python
"""What a command costs before any work: `import hfquant` over `import torch`, `hfquant --help`, and refused
command lines — each in a fresh process, median of --repeats, with `import torch` timed in the same run.

    .venv/bin/python scripts/bench_startup.py [--repeats 5] [--out docs/results/bench_startup.json]

Targets (issue 14): `import hfquant` ≤ 0.3 s over `import torch`; `--help` and config errors < 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
HFQUANT = os.path.join(os.path.dirname(sys.executable), "hfquant")

IMPORT_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
IMPORT_HFQUANT_AFTER_TORCH = ("import time, torch; t = time.perf_counter(); import hfquant; "
                              "print(time.perf_counter() - t)")

COMMANDS = {
    "hfquant --help": [HFQUANT, "--help"],
    "hfquant scheme=nonsense (unknown option)": [HFQUANT, "scheme=nonsense", "output_dir=/tmp/hfquant-bench-startup"],
    "hfquant scheme.weights.num_bits=3 (no backend runs it)": [HFQUANT, "scheme.weights.num_bits=3",
                                                               "output_dir=/tmp/hfquant-bench-startup"],
    "hfquant sceme=w8a16 (a typo)": [HFQUANT, "sceme=w8a16"],
}


def in_process(snippet: str) -> float:
    """The seconds a fresh interpreter prints for `snippet` (its start-up excluded)."""
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def wall(cmd) -> float:
    """Wall seconds of a whole command, as a user waits for it (exit code ignored: errors are the point)."""
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_startup.json"))
    args = ap.parse_args()
    rows = []
    rows.append({"what": "import torch",
                 "seconds": statistics.median(in_process(IMPORT_TORCH) for _ in range(args.repeats))})
    rows.append({"what": "import hfquant, after torch", "target_s": 0.3,
                 "seconds": statistics.median(in_process(IMPORT_HFQUANT_AFTER_TORCH) for _ in range(args.repeats))})
    for label, cmd in COMMANDS.items():
        rows.append({"what": label, "seconds": statistics.median(wall(cmd) for _ in range(args.repeats)), "target_s": 2.0})
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in ("avx512_bf16", "amx_tile")})
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_flags": flags},
              "repeats": args.repeats, "statistic": "median", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("| what | seconds (median) | target |")
    print("|---|---|---|")
    for r in rows:
        target = f"≤ {r['target_s']:g} s" if "target_s" in r else "–"
        print(f"| {r['what']} | {r['seconds']:.2f} | {target} |")


if __name__ == "__main__":
    main()
