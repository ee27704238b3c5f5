"""Tables printed whole: a redirected table is as wide as its content, not cut at 80 columns."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

_WIDEST = 1000  # columns: any real table is narrower; measuring needs a bound


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table``; off a terminal (a file, a pipe) widen the console to fit its rows, as
    rich otherwise assumes 80 columns and cuts figures in ``no_wrap`` columns to "…"."""
    console = console or Console()
    if not console.is_terminal:
        unbounded = console.options.update_width(_WIDEST)
        needed = Measurement.get(console, unbounded, table).maximum
        if needed > console.width:
            console = Console(file=console.file, width=needed)
    console.print(table)
