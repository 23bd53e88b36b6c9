"""The ``mtkd`` application object that every command registers with, and ``--version``."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="mtkd",
    help="Offline multi-teacher knowledge distillation: tokenize → harvest → aggregate → train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: wraps at any width, never cuts a flag's name
)


def _print_version(value: bool) -> None:
    if value:
        from mtkd import __version__

        typer.echo(f"mtkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print mtkd's version and exit.")] = False,
) -> None:
    """Offline multi-teacher knowledge distillation: tokenize → harvest → aggregate → train."""
