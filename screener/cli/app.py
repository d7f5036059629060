"""The root typer application; command modules register themselves on it."""

import typer

app = typer.Typer(
    name="screener",
    help="pacs-screener: batch screening of chest radiographs from a PACS. Not for diagnostic use.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
