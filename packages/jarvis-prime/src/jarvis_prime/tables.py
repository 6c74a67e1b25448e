"""Tables in the terminal that never cut what a reader copies.

Rich shrinks every column of a table wider than the terminal (80 columns, or 80 when
piped) and ends cells with `…`: `prime list` showed `prime-…` for every model. Here
the columns marked `keep` (names, versions, files, ids) are never cut or wrapped, the
others wrap between words; when even that does not fit, each row becomes a block of
`header: value` lines. `jarvis` uses this too; `reactor` (which cannot import jarvis_prime) marks its
columns the same way by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Col:
    """One column: `keep` for values a reader copies (never cut, never wrapped)."""

    header: str
    keep: bool = False
    justify: Literal["left", "right"] = "left"


def print_table(console: Console, columns: Sequence[Col], rows: Iterable[Sequence[str]], *,
                title: str | None = None) -> None:
    """Print `rows` (cells may hold rich markup) as a table whose kept columns are whole and whose
    other columns wrap between words; when the console is too narrow for that, as blocks."""
    rows = [list(row) for row in rows]
    if title:  # its own line: a table's title wraps to the table's width, maybe inside a name
        console.print(title, style="bold", soft_wrap=True)
    overhead = 3 * len(columns) - 1  # a rule between columns, a space either side of each cell; no outer edge
    widths = _fit(columns, rows, console.width - overhead)
    if widths is None:
        _print_blocks(console, columns, rows)
        return
    table = Table(show_edge=False)
    for col, width in zip(columns, widths):
        table.add_column(col.header, justify=col.justify, width=width, no_wrap=col.keep, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _plain(markup: str) -> str:
    return Text.from_markup(markup).plain


def _fit(columns: Sequence[Col], rows: list[list[str]], room: int) -> list[int] | None:
    """Each column's width: as wide as its widest line, the widest of the others given up first,
    one character at a time, down to the longest word (kept columns give up nothing). None if that is not enough."""
    widths, least = [], []
    for i, col in enumerate(columns):
        texts = [col.header] + [_plain(row[i]) for row in rows]
        widths.append(max(len(line) for text in texts for line in text.splitlines() or [""]))
        least.append(widths[-1] if col.keep else max((len(word) for text in texts for word in text.split()), default=1))
    while sum(widths) > room:
        shrinkable = [i for i in range(len(widths)) if widths[i] > least[i]]
        if not shrinkable:
            return None
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1
    return widths


def _print_blocks(console: Console, columns: Sequence[Col], rows: list[list[str]]) -> None:
    """One block per row: its kept values on the first line, then one `header: value` line per other column."""
    for row in rows:
        console.print("  ".join(cell for col, cell in zip(columns, row) if col.keep), style="bold", soft_wrap=True)
        for col, cell in zip(columns, row):
            if not col.keep:
                console.print(f"  {' '.join(col.header.split())}: {cell}", soft_wrap=True)
