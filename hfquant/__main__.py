"""The `hfquant` console script: `hfquant plugins` lists plugins; anything else is the Hydra pipeline."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plugins":
        from .cli import reported_errors, take_verbose_flag
        from .plugins_cli import main as plugins_main

        take_verbose_flag()
        with reported_errors():  # a broken plugin: one line, as for a run
            code = plugins_main(sys.argv[2:])
        sys.exit(code)
    from .cli import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
