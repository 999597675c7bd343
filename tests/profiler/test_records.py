"""JSONL records (`lora_planner.profiler.records`): append durably, read back, report bad lines."""

from __future__ import annotations

import json

from lora_planner.profiler.records import append_record, finished_keys, read_records


def test_append_then_read_round_trips(tmp_path):
    path = tmp_path / "sub" / "runs.jsonl"
    append_record(path, {"key": "a", "status": "ok", "x": 1})
    append_record(path, {"key": "b", "status": "oom"})
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["a", "b"] and bad == []
    assert finished_keys(path) == {"a", "b"}


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join([json.dumps({"key": "a"}), "{truncated", "[1, 2]", "", json.dumps({"no": "key"}),
                               json.dumps({"key": "b"})]) + "\n")
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["a", "b"]
    assert [(b.line_number, b.reason.split(" ")[0]) for b in bad] == [(2, "not"), (3, "not"), (5, "not")]
    assert "JSON" in bad[0].reason and "key" in bad[1].reason


def test_missing_file_reads_as_empty(tmp_path):
    assert read_records(tmp_path / "absent.jsonl") == ([], [])
    assert finished_keys(tmp_path / "absent.jsonl") == set()
