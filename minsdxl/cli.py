"""The command-line glue of train.py and sample.py: their help formatter, and the console scripts
`minsdxl-train` and `minsdxl-sample` of an installed minsdxl.

train.py and sample.py live at the repository root, where they are read and run as
`python train.py ...`. `pip install` installs the same two files as `minsdxl_scripts.train` and
`minsdxl_scripts.sample` (pyproject.toml's `package-dir`), so that no module with a generic name like
`train` lands at the top of site-packages. Each console script runs its file exactly as
`python train.py` would: as `__main__`, with the command line in `sys.argv`.
"""

from __future__ import annotations

import argparse
import runpy


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with the description as written (its example commands keep their line breaks) and each
    flag's default after its help, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", []) or action.default is False:
            return action.help
        return super()._get_help_string(action)


def given_flags(build_parser, argv: list[str] | None) -> set[str]:
    """The flags (argparse dests) that the command line `argv` gives, as opposed to those left at
    their defaults: a second parser from `build_parser()` whose defaults are all `SUPPRESS`."""
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS  # so only flags on the command line appear
    return set(vars(given.parse_args(argv)))


def train() -> None:
    """`minsdxl-train ...` = `python train.py ...`"""
    runpy.run_module("minsdxl_scripts.train", run_name="__main__", alter_sys=True)


def sample() -> None:
    """`minsdxl-sample ...` = `python sample.py ...`"""
    runpy.run_module("minsdxl_scripts.sample", run_name="__main__", alter_sys=True)


def optional_import(module: str, what: str, install: str):
    """Import an optional dependency, or stop with a one-line install hint."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"train.py: error: {what} needs the '{module}' package, which is not installed: {install}") from None
