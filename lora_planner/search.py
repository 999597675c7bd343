"""The largest integer whose predicted peak fits: the micro-batch search behind `recommend`, the web page and the
report's batch claim (pure; no torch).

`largest_fitting(peak, usable, limit)` returns the largest x in [1, limit] with peak(x) <= usable (0 when not even
x = 1 fits), for any peak that never decreases with x: the planner's peak is so in the micro-batch (every saved
activation, logits buffer and scratch grows with the rows; nothing shrinks). It returns exactly what an exponential
+ binary search returns, in fewer planner calls: the planner's peak is close to affine in the batch (fixed states
plus per-row activations), so a secant through the two nearest evaluated points lands on or next to the answer,
usually in 3-4 calls where doubling and bisection need 2 log2(answer) (about 14 for a micro-batch of 87).

`largest_fitting_between(peak, usable, limit, lower, upper)` is the same search inside a known bracket (the rank
ladder's neighbours on both sides), no call at all when the bracket is one number.

The method is safeguarded regula falsi on integers: a bracket lo (fits) < hi (does not fit, or limit + 1) that
only shrinks; each guess is the secant's, clamped strictly inside the bracket; when two secant guesses in a row
fail to halve the bracket, the next guess is the midpoint, so the worst case stays within a small factor of
bisection for peaks far from affine (e.g. a step from a chunked loss switching chunk counts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal


def largest_fitting(peak: Callable[[int], int], usable: int, limit: int, hint: int | None = None,
                    bound: Literal["upper", "lower"] | None = None) -> int:
    """The largest x in [1, limit] with peak(x) <= usable; 0 when peak(1) > usable. `peak` must never decrease.

    `hint`: a likely answer (e.g. the one found for the next rank on the ladder): x = hint and hint + 1 are tried
    first, so a right hint costs two calls. A wrong one costs at most those two, never a different answer.
    `bound`: what the hint is known to be, not only likely: "upper", the answer is at most `hint` (the answer for a
    smaller rank, whose peak is never higher at any x), so a right hint costs one call (and 0 none); "lower", the
    answer is at least `hint` (a larger rank's answer), so x = hint + 1 alone decides a right one."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if hint is not None and bound is not None:
        return _bounded(peak, usable, limit, hint, bound)
    return _search(peak, usable, limit, hint, {}, 0, limit + 1)


def largest_fitting_between(peak: Callable[[int], int], usable: int, limit: int, lower: int, upper: int) -> int:
    """`largest_fitting` when the answer is known to lie in [lower, upper]: between a larger rank's answer and a
    smaller rank's (the peak never falls as r grows, so a rank's answer is at most the smaller rank's and at least the
    larger rank's). No call when they meet: every rung between two ranks that agree has their answer."""
    lower, upper = max(lower, 0), min(upper, limit)
    if lower > upper:
        raise ValueError(f"empty bracket [{lower}, {upper}]")
    if lower == upper:
        return lower
    return _search(peak, usable, limit, None, {}, lower, upper + 1)


def _bounded(peak: Callable[[int], int], usable: int, limit: int, hint: int,
             bound: Literal["upper", "lower"]) -> int:
    """`largest_fitting` with a hint known to bound the answer (see there)."""
    if bound == "upper":
        x = min(hint, limit)
        if x < 1:
            return 0
        known = {x: peak(x)}
        return x if known[x] <= usable else _search(peak, usable, limit, None, known, 0, x)
    x = min(max(hint, 0), limit)
    if x >= limit:
        return limit
    known = {x + 1: peak(x + 1)}
    if known[x + 1] > usable:
        return x
    return _search(peak, usable, limit, None, known, x + 1, limit + 1)


def _search(peak: Callable[[int], int], usable: int, limit: int, hint: int | None, known: dict[int, int],
            lo: int, hi: int) -> int:
    """The search proper from the bracket lo (fits; 0: nothing known to fit) < hi (does not fit, or limit + 1)."""
    for x in ((hint, hint + 1) if hint is not None and 1 <= hint <= limit else ()):
        if x > limit:
            break
        known[x] = peak(x)
        if known[x] > usable:
            hi = x
            break
        lo = x
    if lo == 0:
        if hi > 1:
            known[1] = peak(1)
        if known[1] > usable:
            return 0
        lo = 1
    stalls = 0  # secant guesses in a row that did not halve the bracket (or double lo while hi is unknown)
    while hi - lo > 1:
        before_lo, before_hi = lo, hi
        if stalls >= 2:  # the safeguard: bisect, or double while no failing point is known
            guess, stalls = ((lo + hi) // 2 if hi in known else 2 * lo), 0
        else:
            guess = _secant(known, lo, hi, usable)
        guess = min(max(guess, lo + 1), hi - 1)
        known[guess] = peak(guess)
        if known[guess] <= usable:
            lo = guess
        else:
            hi = guess
        if before_hi in known:
            progress = 2 * (hi - lo) <= before_hi - before_lo
        else:
            progress = hi != before_hi or lo >= 2 * before_lo
        stalls = 0 if progress else stalls + 1
    return lo


def _secant(known: dict[int, int], lo: int, hi: int, usable: int) -> int:
    """Where the line through the two evaluated points nearest the boundary reaches `usable` (rounded down)."""
    if hi in known:
        x0, x1 = lo, hi
    else:  # no failing point yet: extrapolate from the two largest fitting ones (or probe lo + 1)
        below = sorted(x for x in known if x < lo)
        if not below:
            return lo + 1
        x0, x1 = below[-1], lo
    y0, y1 = known[x0], known[x1]
    if y1 <= y0:  # flat: nothing to extrapolate from
        return 2 * lo if hi not in known else (lo + hi) // 2
    return x0 + (usable - y0) * (x1 - x0) // (y1 - y0)
