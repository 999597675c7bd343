"""Plain terminal tables and styled lines (`lora_planner.textable`): exact drawings, wrapping, colour rules."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_planner.textable import Console, Styled, Table, color_enabled, column_widths, draw_table, terminal_width


def small_table() -> Table:
    table = Table(title="Peak (GiB)")
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("LoRA", justify="right")
    table.add_row("weights", "12.57")
    table.add_row("fits on", Styled("a10 or larger", "cyan"))
    return table


def plain(table: Table, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color=False).print(table)
    return out.getvalue()


def test_a_table_is_drawn_like_richs_heavy_head_box():
    assert plain(small_table(), 80) == (
        "Peak (GiB)\n"
        "┏━━━━━━━━━┳━━━━━━━━━━━━━━━┓\n"
        "┃         ┃          LoRA ┃\n"
        "┡━━━━━━━━━╇━━━━━━━━━━━━━━━┩\n"
        "│ weights │         12.57 │\n"
        "│ fits on │ a10 or larger │\n"
        "└─────────┴───────────────┘\n")


def test_a_narrow_terminal_wraps_the_widest_wrappable_column_at_spaces():
    assert plain(small_table(), 24) == (  # 24 columns: 7 + 10 of text, 7 of frame
        "Peak (GiB)\n"
        "┏━━━━━━━━━┳━━━━━━━━━━━━┓\n"
        "┃         ┃       LoRA ┃\n"
        "┡━━━━━━━━━╇━━━━━━━━━━━━┩\n"
        "│ weights │      12.57 │\n"
        "│ fits on │     a10 or │\n"
        "│         │     larger │\n"
        "└─────────┴────────────┘\n")


def test_no_wrap_columns_and_single_words_keep_their_width_past_the_edge():
    # 10 columns: the first never wraps, "larger" is the longest word of the second
    assert column_widths(small_table(), 10) == [7, 6]


@given(st.lists(st.lists(st.text(alphabet="ab c", max_size=12), min_size=2, max_size=2), max_size=6),
       st.integers(min_value=10, max_value=60))
def test_every_line_of_a_table_has_the_same_width_and_fits_when_it_can(rows, width):
    table = Table()
    table.add_column("name")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    lines = ["".join(piece.text for piece in line) for line in draw_table(table, width)]
    assert len({len(line) for line in lines}) == 1
    words = [len(w) for row in rows for cell in row for w in cell.split()] + [len("value"), len("name")]
    if max(words) * 2 + 7 <= width:
        assert len(lines[0]) <= width


def test_row_and_cell_styles_become_ansi_codes_only_with_colour():
    table = Table()
    table.add_column("phase", style="bold")
    table.add_row("backward", style="reverse")
    out = io.StringIO()
    Console(file=out, width=40, color=True).print(table)
    body = out.getvalue().splitlines()[3]
    assert "\x1b[7;1mbackward\x1b[0m" in body and body.startswith("│\x1b[7m \x1b[0m")
    assert "\x1b" not in plain(table, 40)


def test_a_line_of_styled_pieces():
    out = io.StringIO()
    Console(file=out, color=True).print([Styled("llama-2-7b", "bold"), Styled(" (llama)")])
    assert out.getvalue() == "\x1b[1mllama-2-7b\x1b[0m (llama)\n"


@pytest.mark.parametrize("env, tty, expected", [
    ({}, True, True),
    ({}, False, False),
    ({"NO_COLOR": "1"}, True, False),
    ({"TERM": "dumb"}, True, False),
    ({"FORCE_COLOR": "1"}, False, True),
    ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, True, False),  # no-color.org: NO_COLOR wins
])
def test_colour_rules(monkeypatch, env, tty, expected):
    for name in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert color_enabled(Stream()) is expected


@pytest.mark.parametrize("columns, expected", [("132", 132), ("", 80), ("wide", 80), ("0", 80)])
def test_width_comes_from_columns_else_the_terminal(monkeypatch, columns, expected):
    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback: __import__("os").terminal_size(fallback))
    assert terminal_width() == expected


def test_a_row_of_the_wrong_length_is_a_bug_caught_at_once():
    with pytest.raises(ValueError, match="2 cells in a table of 1 columns"):
        table = Table()
        table.add_column("a")
        table.add_row("x", "y")
