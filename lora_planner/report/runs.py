"""Profile records from one or more JSONL files, for `lora-plan report` and `lora-plan calibrate` (pure:
no torch, no pandas).

The reading and checking is `lora_planner.profiler.records.read_records` (the one record reader, which
`--resume` uses too): every line that is not a usable record is named with its file and line number
(`Problem`, "path:line: reason") and skipped; the rest carry their origin in `_source` ("file:line").
A file given twice (`--runs f --runs f`, or two spellings of one path) is read once, with a note.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.profiler.records import KNOWN_SCHEMA_VERSIONS, STATUSES, BadLine, check_record, read_records

__all__ = ["KNOWN_SCHEMA_VERSIONS", "STATUSES", "Problem", "Runs", "check_record", "load_runs", "read_runs"]

Problem = BadLine  # path, line_number, reason; str() is "path:line: reason"


@dataclass
class Runs:
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # each file once, in the order given
    notes: list[str] = field(default_factory=list)  # e.g. a file given twice

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "ok"]


def read_runs(path: str | Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Records of one JSONL file and the problems of its other lines. A missing or unreadable file is a
    `PlannerInputError`; a bad line never is."""
    return read_records(path, "runs", missing_ok=False)


def _identity(path: str) -> tuple[int, int] | str:
    """What makes two paths one file: (device, inode), else the resolved path."""
    try:
        info = os.stat(path)
        return info.st_dev, info.st_ino
    except (OSError, ValueError):
        return os.path.realpath(path) if "\0" not in path else path


def load_runs(paths: list[str] | tuple[str, ...], require: str = "any") -> Runs:
    """Records from every file (each read once). `require` "any": at least one record of any status;
    "ok": at least one measured (status ok) record; otherwise a one-line `PlannerInputError`."""
    if not paths:
        raise PlannerInputError("runs", "no runs file given", "pass --runs runs.jsonl (repeatable)")
    runs = Runs()
    seen: dict[tuple[int, int] | str, str] = {}
    for path in map(str, paths):
        identity = _identity(path)
        if identity in seen:
            same = "given twice" if seen[identity] == path else f"the same file as {seen[identity]}"
            runs.notes.append(f"--runs {path} is {same}: read once")
            continue
        seen[identity] = path
        records, problems = read_runs(path)
        runs.paths.append(path)
        runs.records.extend(records)
        runs.problems.extend(problems)
    usable = runs.ok if require == "ok" else runs.records
    if not usable:
        what = "measured (status ok) profile records" if require == "ok" else "profile records"
        bad = f" ({len(runs.problems)} bad line(s), first {runs.problems[0]})" if runs.problems else ""
        statuses = f"; {len(runs.records)} record(s) without a measurement" if runs.records else ""
        raise PlannerInputError("runs", f"no {what} in {', '.join(runs.paths)}{statuses}{bad}",
                                "run `lora-plan sweep GRID --out runs.jsonl` (or `lora-plan profile`) first")
    return runs
