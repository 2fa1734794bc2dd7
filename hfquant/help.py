"""`hfquant --help`: the config groups, their options and the composed config, in one composition.

Hydra's own `--help` lists the same, but copies the whole config store once per group (~100 groups with
Hydra's), which took 3.5 s on a 2-core machine; this reads the one repository directly.
"""

from __future__ import annotations

from typing import List

from omegaconf import OmegaConf, open_dict

HELP_FLAGS = ("--help", "-h")

USAGE = """\
hfquant — quantize a Hugging Face model, evaluate it against the original, save it (and push it)

usage: hfquant [group=option ...] [key=value ...]        one run
       hfquant -m group=a,b [key=x,y ...]                a sweep: one job per combination, one summary table
       hfquant plugins [--json]                          every plugin, its version and what it registered
       hfquant group=option --help                       the config with that option chosen: its settings
       hfquant --hydra-help                              Hydra's own flags (--cfg job, --info, ...)
       hfquant --verbose ...                             tracebacks instead of one-line errors

Examples: hfquant scheme=w8a16 output_dir=out/w8
          hfquant algorithm=gptq scheme.weights.group_size=64 format=gguf
Docs: docs/usage.md (options), docs/formats.md (what each format is read by), docs/plugins.md (writing plugins)
"""


def _args(argv: List[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_intermixed_args(argv)  # overrides may follow --help (`hfquant x=1 --help y=2`)


def wants_help(argv: List[str]) -> bool:
    """`--help` / `-h` on hfquant's own config tree (with `--config-path` / `--config-dir`, Hydra's help answers)."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return False
    try:
        args = _args(argv)
    except SystemExit:  # a malformed command line: Hydra's parser says what is wrong
        return False
    return not (args.config_path or args.config_dir)


def help_text(overrides: List[str], config_name: str = "config", multirun: bool = False) -> str:
    """Usage, every config group with its options, and the config these overrides compose to."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    from hydra.types import RunMode

    from .precheck import _composition_errors, check_bare_words

    with initialize_config_module(config_module="hfquant.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        check_bare_words(loader, overrides)
        repo = loader.repository
        groups = sorted(g for g in repo.get_group_options("", ObjectType.GROUP) if g != "hydra")
        with _composition_errors(loader, config_name, [], None):
            cfg = loader.load_configuration(config_name, overrides, RunMode.MULTIRUN if multirun else RunMode.RUN,
                                            from_shell=True)
        chosen = cfg.hydra.runtime.choices
        lines = [f"{g}: " + ", ".join(o + ("*" if chosen.get(g) == o else "")
                                      for o in sorted(repo.get_group_options(g, ObjectType.CONFIG))) for g in groups]
    with open_dict(cfg):
        del cfg["hydra"]
    return "\n".join([
        USAGE,
        "== Config groups (group=option; * = this command line's choice, the default unless you chose) ==",
        *lines,
        "",
        "== Config (override anything: key=value) ==",
        OmegaConf.to_yaml(cfg, resolve=False),
    ])


def print_help(argv: List[str]) -> None:
    """Hydra's own parser reads the command line (`-m`, `--config-name NAME` and overrides, as for a run)."""
    args = _args(argv)
    print(help_text(list(args.overrides), args.config_name or "config", bool(args.multirun)))
