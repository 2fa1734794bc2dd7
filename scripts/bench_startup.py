#!/usr/bin/env python
"""What a command costs before any work: `import hfquant` over `import torch`, `hfquant --help`, and refused
command lines — each in a fresh process, median of --repeats, with `import torch` timed in the same run.

    .venv/bin/python scripts/bench_startup.py [--repeats 5] [--out docs/results/bench_startup.json]

Targets (issue 14): `import hfquant` ≤ 0.3 s over `import torch`; `--help` and config errors < 2 s.
Commands run against a cache of their own: `--help` once with it empty (the config nodes made from the plugins and
saved), then every row with the saved copy in place, as after any earlier hfquant command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
HFQUANT = os.path.join(os.path.dirname(sys.executable), "hfquant")

IMPORT_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
IMPORT_HFQUANT = "import time; t = time.perf_counter(); import hfquant; print(time.perf_counter() - t)"
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


def wall(cmd, cache: str) -> float:
    """Wall seconds of a whole command, as a user waits for it (exit code ignored: errors are the point)."""
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", HFQUANT_CACHE=cache))
    return time.perf_counter() - start


def first_help(repeats: int) -> float:
    """`--help` with no saved config nodes (a new install, or plugins changed since the last command)."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="hfquant-bench-cache-") as cache:
            times.append(wall(COMMANDS["hfquant --help"], cache))
    return statistics.median(times)


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
    rows.append({"what": "import hfquant (no torch)",
                 "seconds": statistics.median(in_process(IMPORT_HFQUANT) for _ in range(args.repeats))})
    rows.append({"what": "hfquant --help, first call (nodes made from the plugins, saved)",
                 "seconds": first_help(args.repeats)})
    with tempfile.TemporaryDirectory(prefix="hfquant-bench-cache-") as cache:
        wall(COMMANDS["hfquant --help"], cache)  # saves the nodes, as any earlier command would have
        for label, cmd in COMMANDS.items():
            rows.append({"what": label, "seconds": statistics.median(wall(cmd, cache) for _ in range(args.repeats)),
                         "target_s": 2.0})
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
