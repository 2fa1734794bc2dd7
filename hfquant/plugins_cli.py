"""`hfquant plugins [--json]`: what is installed, at which version, and what each plugin registered."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .plugins import plugin_infos


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hfquant plugins", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    opts = parser.parse_args(argv)
    infos = plugin_infos()
    if opts.json:
        json.dump([i.to_dict() for i in infos], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for info in infos:
        origin = "built-in" if info.builtin else "entry point"
        print(f"{info.name} {info.version or '(unknown version)'} [{origin}]")
        for kind, names in info.registered.items():
            print(f"  {kind}: {', '.join(names)}")
        if not info.registered:
            print(f"  hooks: {', '.join(info.hooks) or '(none)'}")
    return 0
