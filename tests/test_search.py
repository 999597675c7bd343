"""`lora_planner.search.largest_fitting` (and `largest_fitting_between`): the same answer as a plain scan, for any
non-decreasing peak, in fewer calls than doubling + bisection where the peak is affine."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_planner.search import largest_fitting, largest_fitting_between


def scan(peak, usable: int, limit: int) -> int:
    return max((x for x in range(1, limit + 1) if peak(x) <= usable), default=0)


class Counted:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, x: int) -> int:
        assert x >= 1
        self.calls.append(x)
        return self.fn(x)


@pytest.mark.parametrize(("base", "per_row", "usable", "limit", "answer"), [
    (10, 3, 9, 100, 0),        # not even 1
    (10, 3, 13, 100, 1),       # exactly 1 (a peak equal to the usable memory fits)
    (10, 3, 100, 100, 30),     # 10 + 3 x 30 = 100
    (10, 3, 99, 100, 29),
    (10, 0, 50, 64, 64),       # flat: everything fits, up to the limit
    (10, 3, 10**9, 1 << 16, 1 << 16),
    (1000, 7, 1000 + 7 * 87, 1 << 16, 87),
])
def test_affine_peaks(base: int, per_row: int, usable: int, limit: int, answer: int) -> None:
    peak = Counted(lambda x: base + per_row * x)
    assert largest_fitting(peak, usable, limit) == answer
    assert len(set(peak.calls)) == len(peak.calls)  # never the same point twice


def test_an_affine_peak_takes_four_calls_where_doubling_takes_fourteen() -> None:
    """The planner's peak is close to affine in the batch: 1, 2, the secant's guess, and one above it."""
    peak = Counted(lambda x: 1000 + 7 * x)
    assert largest_fitting(peak, 1000 + 7 * 87, 1 << 16) == 87
    assert peak.calls == [1, 2, 87, 88]


@pytest.mark.parametrize(("hint", "calls"), [
    (87, [87, 88]),           # right: two calls
    (86, [86, 87, 88]),       # fits, and so does the next: the secant finishes
    (200, [200, 1, 87, 88]),  # too high: one failing point, then the secant from 1
])
def test_a_hint_costs_two_calls_when_right(hint: int, calls: list[int]) -> None:
    peak = Counted(lambda x: 1000 + 7 * x)
    assert largest_fitting(peak, 1000 + 7 * 87, 1 << 16, hint=hint) == 87
    assert peak.calls == calls


def test_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        largest_fitting(lambda x: x, 10, 0)


@st.composite
def monotone_peaks(draw):
    """A non-decreasing step function on [1, limit]: increments drawn from a mix of flat and steep runs."""
    limit = draw(st.integers(1, 300))
    steps = draw(st.lists(st.integers(0, 50), min_size=limit, max_size=limit))
    values = list(itertools.accumulate(steps, initial=draw(st.integers(0, 100))))[1:]
    usable = draw(st.integers(0, values[-1] + 10))
    hint = draw(st.none() | st.integers(-2, limit + 2))
    return values, usable, limit, hint


@given(monotone_peaks())
def test_equals_a_scan_for_any_non_decreasing_peak(case) -> None:
    values, usable, limit, hint = case
    peak = Counted(lambda x: values[x - 1])
    assert largest_fitting(peak, usable, limit, hint=hint) == scan(peak.fn, usable, limit)
    assert all(1 <= x <= limit for x in peak.calls)
    # the safeguard keeps it within a small multiple of bisection's calls
    assert len(peak.calls) <= 4 * (limit.bit_length() + 2)


def bisection(peak, usable: int, limit: int) -> int:
    """The search it replaced: doubling, then bisection."""
    if peak(1) > usable:
        return 0
    low = 1
    while low * 2 <= limit and peak(low * 2) <= usable:
        low *= 2
    high = min(low * 2, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if peak(mid) <= usable else (low, mid)
    return low


@given(st.integers(0, 10**6), st.integers(1, 10**4), st.integers(1, 1 << 16), st.integers(0, 10**9),
       st.none() | st.integers(1, 1 << 16))
def test_convex_peaks(base: int, per_row: int, limit: int, usable: int, hint: int | None) -> None:
    """A quadratic term (attention scores grow with rows x sequence) bends the secant: still the same answer."""
    peak = Counted(lambda x: base + per_row * x + x * x // 3)
    assert largest_fitting(peak, usable, limit, hint=hint) == bisection(peak.fn, usable, limit)
    assert len(peak.calls) <= 4 * (limit.bit_length() + 2)


@given(monotone_peaks(), st.integers(0, 60))
def test_a_bounding_hint_gives_the_scan_s_answer(case, slack) -> None:
    """A hint known to bound the answer (a smaller rank's answer bounds a larger rank's from above, a larger rank's
    from below): the same answer as a scan, for any bound that holds."""
    values, usable, limit, _ = case
    answer = scan(lambda x: values[x - 1], usable, limit)
    for hint, bound in ((answer + slack, "upper"), (max(answer - slack, 0), "lower")):
        peak = Counted(lambda x: values[x - 1])
        assert largest_fitting(peak, usable, limit, hint=hint, bound=bound) == answer
        assert all(1 <= x <= limit for x in peak.calls)
        assert len(peak.calls) <= 4 * (limit.bit_length() + 2) + 1


@pytest.mark.parametrize(("hint", "bound", "calls"), [
    (29, "upper", [29]),   # right: one call, where an unbounded hint costs two
    (29, "lower", [30]),
    (0, "upper", []),      # nothing fitted at a smaller rank: nothing fits here, no call
    (64, "lower", []),     # the lower bound is the limit already
])
def test_a_right_bounding_hint_costs_one_call_or_none(hint: int, bound: str, calls: list[int]) -> None:
    peak = Counted(lambda x: 10 + 3 * x)
    limit = 64 if hint == 64 else 100
    assert largest_fitting(peak, 99 if hint != 64 else 10**6, limit, hint=hint, bound=bound) == \
        (0 if hint == 0 and bound == "upper" else 64 if hint == 64 else 29)
    assert peak.calls == calls


@given(monotone_peaks(), st.integers(0, 40), st.integers(0, 40))
def test_a_bracket_gives_the_scan_s_answer(case, below, above) -> None:
    """Between a lower and an upper bound that hold (a larger and a smaller rank's answers): the scan's answer, every
    call inside the bracket; none when the bracket is one number."""
    values, usable, limit, _ = case
    answer = scan(lambda x: values[x - 1], usable, limit)
    lower, upper = max(answer - below, 0), min(answer + above, limit)
    peak = Counted(lambda x: values[x - 1])
    assert largest_fitting_between(peak, usable, limit, lower, upper) == answer
    assert all(max(lower, 1) <= x <= upper for x in peak.calls)
    if lower == upper:
        assert peak.calls == []


def test_an_empty_bracket_is_refused() -> None:
    with pytest.raises(ValueError, match="empty bracket"):
        largest_fitting_between(lambda x: x, 10, 100, 5, 4)
