"""A dataset's lengths -> the worst micro-batch (`lora_planner.lengths`): files read, hand-computed worst batches,
the padding share, and one clear error per bad file."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.errors import PlannerInputError
from lora_planner.lengths import length_stats, padding_share, read_lengths, worst_batch


@pytest.mark.parametrize("name, text, expected", [
    ("a.json", "[512, 734, 2048]", (512, 734, 2048)),
    ("a.json", '{"lengths": [3, 1]}', (3, 1)),
    ("a.csv", "num_tokens,id\n12,0\n7,1\n\n", (12, 7)),  # a header, a blank line
    ("a.txt", "5\n6\n", (5, 6)),
])
def test_read_lengths(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert read_lengths(str(path)) == expected


@pytest.mark.parametrize("name, text, fragment", [
    ("a.json", "[1, 2", "not valid JSON"),
    ("a.json", '{"n": 3}', "no list of lengths"),
    ("a.json", "[1, 0]", "item 1: 0 is not a token count"),
    ("a.json", "[1, true]", "item 1: True is not a token count"),
    ("a.csv", "len\n5\nfive\n", "line 3: 'five' is not a token count"),
    ("a.csv", "len\n", "holds no lengths"),
])
def test_read_lengths_refused(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PlannerInputError) as err:
        read_lengths(str(path))
    assert err.value.field == "lengths" and fragment in err.value.problem


@pytest.mark.parametrize("lengths, batch, max_len, packing, seq_len, padding", [
    ((100, 300, 200), 4, None, False, 300, True),  # the longest with shorter ones: padded to 300
    ((100, 300, 200), 4, 256, False, 256, True),  # truncated: 300 -> 256, 200 still shorter
    ((300, 300), 2, None, False, 300, False),  # every example as long: no mask
    ((100, 300), 1, None, False, 300, False),  # one row: nothing to pad
    ((100, 300, 200), 2, 256, True, 256, False),  # packed: bins of 256; 556 tokens fill the micro-batch's 2 bins
    ((100, 300, 200), 4, 256, True, 139, False),  # fewer than 4 bins' worth: all 556 tokens, 4 rows of 139
])
def test_worst_batch(lengths, batch, max_len, packing, seq_len, padding):
    worst = worst_batch(lengths, batch, max_len, packing)
    assert (worst.seq_len, worst.padding, worst.packing) == (seq_len, padding, packing)


def test_worst_batch_says_which():
    worst = worst_batch((100, 5000, 200), 4, 4096, False)
    assert worst.description == ("padded: the longest example (4,096 tokens) with 3 shorter one(s) padded to it, "
                                 "1 truncated to 4,096")
    assert worst.stats == length_stats((100, 5000, 200), 4096)
    assert (worst.stats.examples, worst.stats.median_tokens, worst.stats.longest_tokens) == (3, 200, 5000)


def test_padding_share_hand_count():
    """Lengths 1 and 3, batches of 2 drawn at random: (1,1) (1,3) (3,1) (3,3) hold 2 + 4 + 4 + 6 = 16 tokens in
    2 + 6 + 6 + 6 = 20 padded ones: 20 % padding."""
    assert padding_share((1, 3), 2, None) == pytest.approx(0.2)
    assert padding_share((7, 7, 7), 4, None) == pytest.approx(0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=50), st.integers(1, 16),
       st.one_of(st.none(), st.integers(1, 10_000)))
def test_worst_batch_invariants(lengths, batch, max_len):
    """The worst padded batch is never shorter than any (truncated) example; the packed one never holds more than b
    bins; the padding share is a fraction."""
    lengths = tuple(lengths)
    padded = worst_batch(lengths, batch, max_len, False)
    assert padded.seq_len == max(min(n, max_len) if max_len else n for n in lengths)
    packed = worst_batch(lengths, batch, max_len, True)
    assert packed.seq_len <= (max_len or max(lengths))
    total = sum(min(n, max_len) if max_len else n for n in lengths)
    assert min(total, batch * (max_len or max(lengths))) <= batch * packed.seq_len < total + batch or \
        batch * packed.seq_len == batch * (max_len or max(lengths))
    assert 0.0 <= padding_share(lengths, batch, max_len) < 1.0
    json.dumps(padded.description)
