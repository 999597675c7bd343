"""A small Markdown (GitHub pipe table) renderer for pandas DataFrames, so reports need no `tabulate`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

Formatter = Callable[[Any], str]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def escape(text: str) -> str:
    """Keep a cell on one line and inside its column."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _is_missing(value: Any) -> bool:
    try:
        return value is None or bool(value != value)  # NaN, pandas NA
    except (TypeError, ValueError):
        return False


def md_table(frame: Any, formats: Mapping[str, Formatter | str] | None = None, index: bool = False,
             align: Mapping[str, str] | None = None) -> str:
    """A pipe table of `frame` (a DataFrame). `formats` maps a column to a format spec ("{:.2f}") or a
    function; missing values print as "-"; numeric columns are right-aligned unless `align` says "l"."""
    formats = dict(formats or {})
    align = dict(align or {})
    data = frame.reset_index() if index else frame
    columns = [str(c) for c in data.columns]
    if not columns:
        return ""
    rows = []
    for values in data.itertuples(index=False, name=None):
        row = []
        for column, value in zip(columns, values):
            fmt = formats.get(column)
            if _is_missing(value):
                text = "-"
            elif callable(fmt):
                text = fmt(value)
            elif isinstance(fmt, str):
                text = fmt.format(value)
            else:
                text = _cell(value.item() if hasattr(value, "item") else value)
            row.append(escape(text))
        rows.append(row)
    numeric = {c for c in columns if str(data[c].dtype).startswith(("int", "float", "Int", "Float"))}
    marks = []
    for c in columns:
        side = align.get(c, "r" if c in numeric else "l")
        marks.append("---:" if side == "r" else ":---:" if side == "c" else "---")
    lines = ["| " + " | ".join(escape(c) for c in columns) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bullet_list(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)
