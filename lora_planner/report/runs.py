"""Profile records from one or more JSONL files, checked line by line (pure: no torch, no pandas).

Every line that is not a usable record (not JSON, not an object, not a profile record, a schema this
code does not know, or a record missing the fields a report needs) is named with its file and line
number and skipped; the rest are returned with their origin in `_source` ("file:line").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError

KNOWN_SCHEMA_VERSIONS = (1,)
STATUSES = ("ok", "oom", "error")


@dataclass(frozen=True)
class Problem:
    path: str
    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.reason}"


@dataclass
class Runs:
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "ok"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_record(record: Any) -> str | None:
    """Why `record` cannot be used, or None when it can."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    if "key" not in record:
        return "not a profile record (no 'key')"
    version = record.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        return f"record schema_version {version!r} is not one this report reads ({KNOWN_SCHEMA_VERSIONS})"
    status = record.get("status")
    if status not in STATUSES:
        return f"status {status!r} is not one of {', '.join(STATUSES)} (a partial record?)"
    settings, predicted = record.get("settings"), record.get("predicted")
    if not isinstance(settings, dict) or not all(k in settings for k in ("method", "batch_size", "seq_len")):
        return "no settings (method, batch_size, seq_len)"
    if not isinstance(predicted, dict) or not _number(predicted.get("peak_bytes")) or \
            not isinstance(predicted.get("breakdown_bytes"), dict):
        return "no predicted peak_bytes / breakdown_bytes"
    for name in ("model", "backend", "mode", "family"):
        if not isinstance(record.get(name), str):
            return f"no {name!r}"
    if status == "ok":
        measured = record.get("measured")
        if not isinstance(measured, dict) or not _number(measured.get("peak_bytes")) or measured["peak_bytes"] <= 0:
            return "status ok but no positive measured peak_bytes"
    return None


def read_runs(path: str | Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Records of one JSONL file and the problems of its other lines. A missing or unreadable file is a
    `PlannerInputError`; a bad line never is."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PlannerInputError("runs", f"cannot read {path} ({err.strerror or err})",
                                "pass a JSONL file written by `lora-plan sweep` or `lora-plan profile`") from None
    records: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(str(path), number, f"not JSON ({err.msg}; a line cut short?)"))
            continue
        reason = check_record(record)
        if reason:
            problems.append(Problem(str(path), number, reason))
            continue
        record["_source"] = f"{path}:{number}"
        records.append(record)
    return records, problems


def load_runs(paths: list[str] | tuple[str, ...], require: str = "any") -> Runs:
    """Records from every file. `require` "any": at least one record of any status; "ok": at least one
    measured (status ok) record; otherwise a one-line `PlannerInputError`."""
    if not paths:
        raise PlannerInputError("runs", "no runs file given", "pass --runs runs.jsonl (repeatable)")
    runs = Runs(paths=[str(p) for p in paths])
    for path in paths:
        records, problems = read_runs(path)
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
