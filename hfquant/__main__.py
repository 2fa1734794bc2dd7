"""The `hfquant` console script: `hfquant plugins` lists plugins; anything else is the Hydra pipeline."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plugins":
        from .plugins_cli import main as plugins_main

        sys.exit(plugins_main(sys.argv[2:]))
    from .cli import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
