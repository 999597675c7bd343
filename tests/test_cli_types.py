"""The command line's one validation layer: exact cases per type, and every option of every subcommand uses it."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_planner.cli_args import build_parser
from lora_planner.cli_types import (
    MAX_TEXT_CHARS, Integer, Number, Text, count, fraction, option_error, positive_number,
)

FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_is_checked_by_a_cli_type():
    """No option reads a bare int / float / str: each value goes through lora_planner.cli_types (or is a
    flag, or a closed set of choices)."""
    unchecked = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, FLAG_ACTIONS) or action.choices is not None:
                continue
            if not isinstance(action.type, (Text, Integer, Number)):
                unchecked.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert unchecked == []


def test_no_subcommand_accepts_abbreviations():
    parser = build_parser()
    assert not parser.allow_abbrev
    assert all(not sub.allow_abbrev for sub in _subparsers(parser).values())


@pytest.mark.parametrize("kind, text, value", [
    (count("r", "--r 8", 16), "8", 8),
    (count("r", "--r 8", 16), " 16 ", 16),
    (count("r", "--r 8", 16), "1_0", 10),
    (count("seed", "--seed 0", 10, low=0), "0", 0),
    (fraction("mfu", "--mfu 0.4", zero=False, one=True), "1", 1.0),
    (fraction("headroom", "--headroom 0.1", zero=True, one=False), "0", 0.0),
    (fraction("headroom", "--headroom 0.1", zero=True, one=False), "0.999", 0.999),
    (positive_number("alpha", "--alpha 16"), "1e300", 1e300),
    (positive_number("alpha", "--alpha 16"), "5e-324", 5e-324),
    (Text("model", "--model gpt2"), "gpt2", "gpt2"),
    (Text("model", "--model gpt2"), "x" * MAX_TEXT_CHARS, "x" * MAX_TEXT_CHARS),
])
def test_accepted_values(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize("kind, text, message", [
    (count("r", "--r 8", 16), "0", "must be an integer in [1, 16], got 0; pass e.g. --r 8"),
    (count("r", "--r 8", 16), "17", "must be an integer in [1, 16], got 17; pass e.g. --r 8"),
    (count("r", "--r 8", 16), "10" * 20, "got 1.01e+39"),
    (count("r", "--r 8", 16), "8.0", "'8.0' is not an integer"),
    (count("r", "--r 8", 16), "0x10", "'0x10' is not an integer"),
    (count("r", "--r 8", 16), "", "empty value; pass e.g. --r 8"),
    (fraction("mfu", "--mfu 0.4", zero=False, one=True), "0", "must be in (0, 1], got 0"),
    (fraction("mfu", "--mfu 0.4", zero=False, one=True), "1.0000001", "must be in (0, 1]"),
    (fraction("headroom", "--headroom 0.1", zero=True, one=False), "1", "must be in [0, 1), got 1"),
    (fraction("headroom", "--headroom 0.1", zero=True, one=False), "-0.0001", "must be in [0, 1)"),
    (positive_number("alpha", "--alpha 16"), "0", "must be in (0, inf], got 0"),
    (positive_number("alpha", "--alpha 16"), "inf", "'inf' is not a finite number"),
    (positive_number("alpha", "--alpha 16"), "-Infinity", "'-Infinity' is not a finite number"),
    (positive_number("alpha", "--alpha 16"), "NaN", "'NaN' is not a finite number"),
    (positive_number("alpha", "--alpha 16"), "1e400", "'1e400' is not a finite number"),
    (positive_number("alpha", "--alpha 16"), "sixteen", "'sixteen' is not a number"),
    (Text("gpu-mem", "--gpu-mem 24GiB"), "", "empty value"),
    (Text("gpu-mem", "--gpu-mem 24GiB"), "   ", "empty value"),
    (Text("model", "--model gpt2"), "x" * (MAX_TEXT_CHARS + 1), "4,097 characters, more than the 4,096 allowed"),
    (Text("model", "--model gpt2"), "a\nb", "contains a control character"),
    (Text("model", "--model gpt2"), "a\x00b", "contains a control character"),
])
def test_refused_values_say_why_and_the_fix(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        kind(text)
    assert message in str(err.value)
    assert "; pass e.g. " in str(err.value)


@pytest.mark.parametrize("message, parsed", [
    ("argument --seq-len: must be an integer in [1, 9], got 0; pass e.g. --seq-len 2048",
     ("seq-len", "must be an integer in [1, 9], got 0", "pass e.g. --seq-len 2048")),
    ("argument --methods/--method: empty value; pass e.g. --methods lora",
     ("methods", "empty value", "pass e.g. --methods lora")),
    ("argument --adapter-dtype: invalid choice: 'x' (choose from fp32, base)",
     ("adapter-dtype", "invalid choice: 'x' (choose from fp32, base)", "")),
    ("unrecognized arguments: --mod", None),
])
def test_option_error_splits_argparse_messages(message, parsed):
    assert option_error(message) == parsed


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_numbers_are_finite_and_in_range_or_refused(x):
    kind = Number("x", -1.0, 1.0, "--x 0", low_open=True)
    try:
        value = kind(repr(x))
    except argparse.ArgumentTypeError:
        assert not (math.isfinite(x) and -1 < x <= 1)
    else:
        assert math.isfinite(value) and -1 < value <= 1 and value == x


@given(st.integers())
def test_integers_are_in_range_or_refused(n):
    kind = Integer("n", 1, 1000, "--n 5")
    try:
        value = kind(str(n))
    except argparse.ArgumentTypeError:
        assert not 1 <= n <= 1000
    else:
        assert value == n
