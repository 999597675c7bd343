"""The profile table (`lora_planner.render_profile`): columns and the allocator check's column."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from lora_planner.render_profile import profile_table

MIB = 2**20


def _record(peak: int, allocator: int | None) -> dict:
    return {"status": "ok", "backend": "hf", "mode": "cpu",
            "settings": {"method": "full", "batch_size": 2, "seq_len": 32},
            "predicted": {"peak_bytes": 3 * MIB, "coarse_phase": "backward"},
            "measured": {"peak_bytes": peak, "peak_phase": "backward", "allocator_peak_bytes": allocator},
            "relative_error": 3 * MIB / peak - 1, "median_step_time_s": None}


def _text(records: list[dict]) -> str:
    console = Console(width=200, record=True)
    console.print(profile_table(records))
    return console.export_text()


@pytest.mark.parametrize("allocator, shown", [
    (None, False),            # fake / CUDA runs carry no allocator check
    (3 * MIB + 1000, False),  # within 0.5 % of the tracker: nothing to say
    (3 * MIB - 200_000, True),  # the eager experts loop: the tracker's out-of-place sums
])
def test_allocator_column_only_where_it_differs(allocator, shown):
    text = _text([_record(3 * MIB, allocator)])
    assert (re.search(r"┃\s*alloc\s*┃", text) is not None) is shown
    if shown:
        assert f"{(3 * MIB - 200_000) / MIB:.2f}" in text and "sums gradients in place" in text
    assert "+0.00%" in text
