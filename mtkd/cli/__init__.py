"""The ``mtkd`` command line: the only place that parses arguments.

Each command is a thin wrapper over a library function: the stage commands in
:mod:`~mtkd.cli.stages`, the tools around them in :mod:`~mtkd.cli.tools`, their options made
from the stages' config dataclasses in :mod:`~mtkd.cli.options`.
"""

from __future__ import annotations

import sys

from mtkd.cli import stages, tools  # noqa: F401  (they register their commands with app)
from mtkd.cli.app import app

__all__ = ["INTERRUPTED", "app", "main"]

#: What an interrupted command leaves: every stage commits whole parts or checkpoints only.
INTERRUPTED = ("mtkd: interrupted; committed parts and checkpoints are kept, and the same command "
               "resumes from them")


def main() -> None:
    """The console entry point: the commands, and a word on what an interrupt (Ctrl-C) kept."""
    try:
        app(prog_name="mtkd")
    except SystemExit as e:
        if e.code == 130:  # typer's exit on KeyboardInterrupt, silent otherwise
            print(INTERRUPTED, file=sys.stderr)
        raise

