"""Output helpers shared by every command: --json, tables, durations and sizes."""

from __future__ import annotations

import json
import sys
import time

import click
from nightshift.jobs.reads import duration


def json_option(fn):
    """Add ``--json`` to a read command (machine-readable output for scripts)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def console():
    # Click's runner swaps sys.stdout; ask for it when printing, not at import. rich is
    # imported here, not at the top: `status JOB` must start fast and prints no table.
    from rich.console import Console

    # Piped (a script, grep, a file): rows stay whole on one line each, however long,
    # instead of wrapping at rich's default 80 columns.
    width = None if sys.stdout.isatty() else 1000
    return Console(file=sys.stdout, soft_wrap=True, width=width)


def table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    """Print a table. Cells are text, never markup: a job called ``[/bold]`` is shown as
    such instead of breaking the table, and control characters are escaped."""
    from rich.markup import escape
    from rich.table import Table

    def cell(value) -> str:
        return "" if value is None else escape(printable(str(value)))

    t = Table(*map(cell, columns), title=title and cell(title), box=None, header_style="bold",
              pad_edge=False)
    for row in rows:
        t.add_row(*map(cell, row))
    console().print(t)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def ago(ts: float | None) -> str:
    return "-" if ts is None else f"{duration(time.time() - ts)} ago"


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def printable(text: str) -> str:
    """``text`` with control and other invisible characters escaped (``\\x1b``,
    ``\\u202e``): a message that quotes a submitted file cannot move the cursor, clear
    the terminal or split itself into lines that look like other messages."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in text)


def echo(text: str = "", err: bool = False) -> None:
    """``click.echo`` of a line that quotes names, paths or sources users wrote, with
    control characters escaped (see ``printable``)."""
    click.echo(printable(text), err=err)


def quiet_unless_tty(quiet: bool) -> bool:
    """Progress shows on a terminal only, never when piped or with --quiet."""
    return quiet or not sys.stderr.isatty()


__all__ = ["json_option", "print_json", "table", "duration", "size", "ago", "when", "rate",
           "console", "quiet_unless_tty", "printable", "echo"]
