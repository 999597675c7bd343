"""The command line's one validation layer: every option's text becomes a checked value here.

Each `add_argument` of every subcommand names one of these argparse types (a test walks the parsers and
refuses an option declared with a bare `int`, `float` or `str`), so a value is checked the same way
whatever subcommand takes it:

- `Integer(field, low, high)`: a decimal integer in [low, high]; `low`/`high` are the documented bounds of
  the setting (for sizes that `lora_planner.specs` also checks, the same constants);
- `Number(field, low, high, ...)`: a finite decimal number (`nan`, `inf`, `1e400` are refused) in a range
  whose ends are open or closed as stated;
- `Text(field)`: a non-empty string (an empty `--gpu-mem ""` is an error, not "not given"), without NUL
  bytes or control characters, at most `MAX_TEXT_CHARS` characters (longer than any path Linux opens).

A refused value raises `argparse.ArgumentTypeError("<problem>; <fix>")`; the CLI's parser turns argparse's
"argument --x: <problem>; <fix>" into one `PlannerInputError("x", problem, fix)` line, exit code 2.
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

MAX_TEXT_CHARS = 4096  # Linux PATH_MAX; no model name, GPU name or list of targets is longer
MAX_THREADS = 1024  # torch.set_num_threads overflows on huge values; no CPU has more hardware threads
MAX_STEPS = 10_000  # measured steps per profile run
MAX_SEED = 2**32 - 1  # the widest seed every RNG we feed accepts (numpy's)
MAX_COUNT = 10**9  # --limit and other plain counts
MAX_TRAIN_TOKENS = 10**15  # a quadrillion tokens: ~30x the largest published pre-training run


def _refuse(problem: str, fix: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{problem}; {fix}")


def _check_text(text: str, example: str) -> str:
    if not text.strip():
        raise _refuse("empty value", f"pass e.g. {example}")
    if len(text) > MAX_TEXT_CHARS:
        raise _refuse(f"{len(text):,} characters, more than the {MAX_TEXT_CHARS:,} allowed", f"pass e.g. {example}")
    if any(ord(ch) < 32 and ch not in "\t" for ch in text):
        raise _refuse("contains a control character", f"pass e.g. {example}")
    return text


class Text(NamedTuple):
    """A non-empty, bounded string option."""

    field: str
    example: str

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return "text"

    def __call__(self, text: str) -> str:
        return _check_text(text, self.example)


class Integer(NamedTuple):
    """An integer option in [low, high] (high None: no upper bound beyond `MAX_COUNT`)."""

    field: str
    low: int
    high: int
    example: str

    @property
    def __name__(self) -> str:
        return "integer"

    def __call__(self, text: str) -> int:
        _check_text(text, self.example)
        try:
            value = int(text.strip().replace("_", ""), 10)
        except ValueError:
            raise _refuse(f"{text.strip()[:40]!r} is not an integer", f"pass e.g. {self.example}") from None
        if not self.low <= value <= self.high:
            shown = f"{value:.3g}" if abs(value) >= 10**12 else str(value)
            raise _refuse(f"must be an integer in [{self.low:,}, {self.high:,}], got {shown}",
                          f"pass e.g. {self.example}")
        return value


class Number(NamedTuple):
    """A finite number option in a range: [low, high], with either end open (`low_open` / `high_open`)."""

    field: str
    low: float
    high: float
    example: str
    low_open: bool = False
    high_open: bool = False

    @property
    def __name__(self) -> str:
        return "number"

    def interval(self) -> str:
        high = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}{')' if self.high_open else ']'}"

    def __call__(self, text: str) -> float:
        _check_text(text, self.example)
        try:
            value = float(text.strip())
        except ValueError:
            raise _refuse(f"{text.strip()[:40]!r} is not a number", f"pass e.g. {self.example}") from None
        if not math.isfinite(value):
            raise _refuse(f"{text.strip()[:40]!r} is not a finite number", f"pass e.g. {self.example}")
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        if not (above_low and below_high):
            raise _refuse(f"must be in {self.interval()}, got {value:g}", f"pass e.g. {self.example}")
        return value


def fraction(field: str, example: str, *, zero: bool, one: bool) -> Number:
    """A fraction in [0, 1] with 0 and / or 1 excluded as asked."""
    return Number(field, 0.0, 1.0, example, low_open=not zero, high_open=not one)


def positive_number(field: str, example: str) -> Number:
    return Number(field, 0.0, math.inf, example, low_open=True)


def count(field: str, example: str, high: int = MAX_COUNT, low: int = 1) -> Integer:
    return Integer(field, low, high, example)


# The error argparse raises for a refused value reads "argument --seq-len: <problem>; <fix>"; `option_error`
# splits it back into the field, the problem and the fix.
def option_error(message: str) -> tuple[str, str, str] | None:
    """(field, problem, fix) of argparse's "argument --x[/--y]: problem[; fix]" message, or None."""
    if not message.startswith("argument "):
        return None
    head, sep, rest = message.partition(": ")
    if not sep:
        return None
    names = head.removeprefix("argument ").split("/")
    field = next((n.lstrip("-") for n in names if n.startswith("--")), names[0].lstrip("-"))
    problem, sep, fix = rest.partition("; ")
    return field, problem, fix if sep else ""
