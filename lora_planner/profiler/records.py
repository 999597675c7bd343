"""Profile records: one JSON object per run, appended to a JSONL file the moment a run finishes.

An interrupted sweep loses nothing (each line is flushed and fsynced on its own) and `--resume` skips
runs whose key is already in the file. This module imports no torch, so reports and `calibrate` can
read records on any machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BadLine:
    line_number: int
    reason: str


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a line and make it durable before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """Every well-formed record, and the line numbers of the rest (unreadable JSON, not an object,
    no run key), so a report can name them instead of crashing."""
    records: list[dict[str, Any]] = []
    bad: list[BadLine] = []
    path = Path(path)
    if not path.exists():
        return records, bad
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(BadLine(number, f"not JSON ({err.msg})"))
                continue
            if not isinstance(record, dict) or "key" not in record:
                bad.append(BadLine(number, "not a profile record (no 'key')"))
                continue
            records.append(record)
    return records, bad


def finished_keys(path: str | Path) -> set[str]:
    """Run keys already recorded (any status), for `--resume`."""
    records, _ = read_records(path)
    return {record["key"] for record in records}
