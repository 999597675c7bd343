"""Plain terminal output for the planner's answer: styled lines and box tables, with nothing but the stdlib.

The estimate path (`lora-plan --model ... --r 8`) must answer cold in <= 0.08 s (issue 11); rich alone costs
~45 ms to import and draw, so the planner's own tables are drawn here. They look like rich's default table
(`rich.box.HEAVY_HEAD`: a heavy frame around the header, light lines below, a left-justified italic title)
so that every subcommand's output reads alike; the slower subcommands (profiling, sweeps, recommend) keep rich.

Colour follows the usual conventions: ANSI styles only when the output is a terminal, never when `NO_COLOR`
is set (https://no-color.org) or `TERM=dumb`; `FORCE_COLOR` forces them. Width: `COLUMNS`, else the terminal's,
else 80 columns. A table wider than that wraps the cells of its wrappable columns at spaces, widest column
first; a column marked `no_wrap` (and any single word, unless the column folds) keeps its width, and the table
then runs past the edge.

Known limitations: no East Asian wide characters (every character counts one column); styles are a fixed set.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from typing import IO, Literal, NamedTuple

Justify = Literal["left", "right"]

# SGR codes of the styles the renderers use (ECMA-48): a style is space-separated words, e.g. "bold red".
SGR: dict[str, str] = {"bold": "1", "dim": "2", "italic": "3", "reverse": "7", "red": "31", "green": "32",
                       "yellow": "33", "cyan": "36"}


class Styled(NamedTuple):
    """A cell or a piece of a line with its style ("" for none)."""

    text: str
    style: str = ""


Cell = str | Styled


class Column(NamedTuple):  # NamedTuples and a plain class here: each dataclass costs ~0.6 ms of cold start
    header: str
    justify: Justify = "left"
    style: str = ""  # applied to every cell of the column (a cell's own style comes after it)
    no_wrap: bool = False
    fold: bool = False  # long words (model names, repo ids) may be cut across lines, down to `min_width`
    min_width: int = 1


class Table:
    """Rows of cells under column headers, with a title above and a caption below (built row by row, then
    drawn once)."""

    def __init__(self, title: str = "", caption: str = "") -> None:
        self.title = title
        self.caption = caption
        self.columns: list[Column] = []
        self.rows: list[tuple[list[Styled], str]] = []  # (cells, the row's style)

    def add_column(self, header: str, justify: Justify = "left", style: str = "", no_wrap: bool = False,
                   fold: bool = False, min_width: int = 1) -> None:
        self.columns.append(Column(header, justify, style, no_wrap, fold, min_width))

    def add_row(self, *cells: Cell, style: str = "") -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(self.columns)} columns")
        self.rows.append(([c if isinstance(c, Styled) else Styled(c) for c in cells], style))


def color_enabled(file: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return os.environ.get("TERM") != "dumb" and hasattr(file, "isatty") and file.isatty()


def terminal_width() -> int:
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size((80, 24)).columns


class Console:
    """Where lines go: a file (stdout), a width, colour or not. `print` takes the keywords rich's does, so
    `lora_planner.render.print_wrapped` serves both this console and rich's."""

    def __init__(self, file: IO[str] | None = None, width: int | None = None, color: bool | None = None) -> None:
        self.file = file if file is not None else sys.stdout
        self.width = width if width is not None else terminal_width()
        self.color = color_enabled(self.file) if color is None else color

    def styled(self, text: str, style: str) -> str:
        codes = [SGR[word] for word in style.split() if word in SGR] if self.color else []
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m" if codes and text else text

    def print(self, item: str | Table | list[Styled] = "", style: str = "", **_rich_keywords: object) -> None:
        """A line (styled as a whole), a line of styled pieces, or a table."""
        if isinstance(item, Table):
            lines = draw_table(item, self.width)
        elif isinstance(item, list):
            lines = [item]
        else:
            lines = [[Styled(item, style)]]
        self.file.write("".join("".join(self.styled(p.text, p.style) for p in line) + "\n" for line in lines))


# --------------------------------------------------------------------------------------------- drawing


def _min_width(column: Column, cells: list[str]) -> int:
    """The narrowest the column can be: its longest word (its longest cell when it does not wrap, its
    `min_width` when it folds)."""
    texts = [column.header, *cells]
    if column.fold:
        return min(column.min_width, max(len(t) for t in texts))
    if column.no_wrap:
        return max(len(t) for t in texts)
    return max((len(word) for t in texts for word in t.split()), default=0)


def column_widths(table: Table, width: int) -> list[int]:
    """Each column's text width: its widest cell, shrunk (widest first, down to its longest word) until the
    table fits `width` with its frame (one border per column plus one, a space each side of every cell)."""
    cells = [[row[0][i].text for row in table.rows] for i in range(len(table.columns))]
    widths = [max(len(t) for t in [col.header, *cells[i]]) for i, col in enumerate(table.columns)]
    floors = [_min_width(col, cells[i]) for i, col in enumerate(table.columns)]
    frame = 3 * len(widths) + 1
    while sum(widths) + frame > width:
        shrinkable = [i for i in range(len(widths)) if widths[i] > floors[i]]
        if not shrinkable:
            break
        i = max(shrinkable, key=lambda k: widths[k])
        widths[i] -= 1
    return widths


def _wrap(text: str, width: int, fold: bool = False) -> list[str]:
    return textwrap.wrap(text, width=width, break_long_words=fold, break_on_hyphens=False) or [""]


def _cell_lines(text: str, width: int, justify: Justify, fold: bool = False) -> list[str]:
    lines = _wrap(text, width, fold) if len(text) > width else [text]
    return [line.rjust(width) if justify == "right" else line.ljust(width) for line in lines]


Line = list[Styled]


def draw_table(table: Table, width: int) -> list[Line]:
    """The table as lines of styled pieces (pure: the console turns styles into ANSI codes or drops them)."""
    widths = column_widths(table, width)
    out: list[Line] = [[Styled(line, "italic")] for line in (_wrap(table.title, max(width, 20)) if table.title
                                                            else [])]
    out.append([Styled("┏" + "┳".join("━" * (w + 2) for w in widths) + "┓")])
    header = [_cell_lines(col.header, w, col.justify, col.fold) for col, w in zip(table.columns, widths)]
    out += _frame_lines(header, "┃", ["bold"] * len(widths), "")
    out.append([Styled("┡" + "╇".join("━" * (w + 2) for w in widths) + "┩")])
    for cells, row_style in table.rows:
        wrapped = [_cell_lines(cell.text, w, col.justify, col.fold) for cell, col, w in
                   zip(cells, table.columns, widths)]
        styles = [" ".join(s for s in (col.style, cell.style) if s) for cell, col in zip(cells, table.columns)]
        out += _frame_lines(wrapped, "│", styles, row_style)
    out.append([Styled("└" + "┴".join("─" * (w + 2) for w in widths) + "┘")])
    out += [[Styled(line, "dim")] for line in (_wrap(table.caption, max(width, 20)) if table.caption else [])]
    return out


def _frame_lines(cells: list[list[str]], bar: str, styles: list[str], row_style: str) -> list[Line]:
    """One line per text line of the tallest cell; the row's style spans the line inside the frame."""
    lines = []
    for k in range(max(len(lines_of_cell) for lines_of_cell in cells)):
        line = [Styled(bar)]
        for lines_of_cell, style in zip(cells, styles):
            text = lines_of_cell[k] if k < len(lines_of_cell) else " " * len(lines_of_cell[0])
            both = " ".join(s for s in (row_style, style) if s)
            line += [Styled(" ", row_style), Styled(text, both), Styled(" ", row_style), Styled(bar)]
        lines.append(line)
    return lines
