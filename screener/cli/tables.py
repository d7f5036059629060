"""Tables for terminals and pipes alike: whole values on one line each."""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

WRAPPED_MIN_WIDTH = 30  # the last (free-text) column's least width before it wraps


def print_table(out: Console, table: Table, rows: list[list[str]], wrapped: bool = True) -> None:
    """Print ``table`` at least as wide as its one-line columns need (``rows``: the raw,
    unescaped cells), so that neither an 80-column pipe nor a terminal cuts a value with
    "…"; the last column wraps from ``WRAPPED_MIN_WIDTH`` on when ``wrapped``."""
    widths = [
        max([cell_len(str(column.header))] + [cell_len(row[i]) for row in rows])
        for i, column in enumerate(table.columns)
    ]
    if wrapped and widths:
        widths[-1] = min(widths[-1], WRAPPED_MIN_WIDTH)
    needed = sum(width + 3 for width in widths) + 1  # padding and a border per column
    if needed > out.width:
        out = Console(width=needed, file=out.file)
    out.print(table)
