"""Profile records: one JSON object per run, appended to a JSONL file the moment a run finishes, and the
one reader that checks them (used by `--resume`, `lora-plan report` and `lora-plan calibrate`).

This module imports no torch, so reports and `calibrate` can read records on any machine.

Writing:
- `append_record` writes a record as one line of standard JSON (`files.dumps_strict`: NaN / Infinity are
  never written) with a single write call, then fsyncs it, so an interrupted sweep loses at most the run
  in progress. An append always starts on a fresh line: when the file does not end in a newline (a write
  cut short), a newline goes first, so the fragment stays one bad line and never swallows the next record.
- `RecordWriter` never loses a record: when an append fails (disk full, the file replaced by a folder,
  ...), the record is printed on stderr as one JSON line and appended to a fallback file in the temp
  folder (`files.fallback_path`), one line says where, and every later record goes there too; the
  caller finishes its runs and exits 1 (`RecordWriter.summary`).

Reading (`read_records`): a regular file of at most `files.MAX_RECORDS_BYTES`, each line parsed with
`files.loads_strict` and checked by `check_record` against the fields the report (`report/build.py`,
`tables.py`, `claims.py`, `charts.py`), `calibrate` and `--resume` read, with their types: strings,
positive integers, finite non-negative byte counts, booleans, null where allowed, objects of byte counts
(breakdowns), lists of positive numbers (step times). A line that is not a usable record (not UTF-8, not
standard JSON, nested too deeply, not an object, an unknown schema_version or status, a field missing or
of the wrong type, the last line cut short) is a `BadLine` ("path:line: reason") and skipped: a bad line
never raises. `finished_keys` (`--resume`) counts valid records only, so a broken line's run is run again.

Known limitations: fields no reader uses (`versions`, `settings.adapted_modules`, the distributed
per-rank extras of `measured`) are not checked; a record's numbers are checked one by one, not against
each other (a breakdown need not sum to its peak).
"""

from __future__ import annotations

import datetime as dt
import errno
import math
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_planner.specs import METHODS
from lora_planner.files import MAX_RECORDS_BYTES, dumps_strict, fallback_path, loads_strict, read_user_bytes

RECORD_SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
STATUSES = ("ok", "oom", "error")
MAX_DEPTH = 32  # real records nest 6 deep (measured.phases.forward.end_breakdown.activations)
MAX_COUNT = 2**31 - 1  # batch sizes, sequence lengths, ranks, steps, GPUs
MAX_BYTES = 2**62  # 4 EiB: far above any memory, and still exact as a float
MIN_SECONDS, MAX_SECONDS = 1e-9, 1e9  # a step time: tokens / time stays finite (a chart's axis limit)
READ_FIXES = {
    "runs": "pass a JSONL file written by `lora-plan sweep` or `lora-plan profile`",
    "out": "pass --out a JSONL records file written by `lora-plan sweep` / `lora-plan profile`, or a new path",
}


@dataclass(frozen=True)
class BadLine:
    """A line of a records file that is not a usable record, and why."""

    path: str
    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.reason}"


# ---------------------------------------------------------------------------------------------- schema

# A checker takes a value and where it is ("settings.r") and says what is wrong with it, or None.
Checker = Callable[[Any, str], "str | None"]


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= MAX_BYTES and (isinstance(value, int) or math.isfinite(value))


def _kind(what: str, test: Callable[[Any], bool]) -> Checker:
    def check(value: Any, where: str) -> str | None:
        return None if test(value) else f"{where} is {_show(value)}, not {what}"

    return check


def _nullable(checker: Checker) -> Checker:
    return lambda value, where: None if value is None else checker(value, where)


def _list_of(checker: Checker) -> Checker:
    def check(value: Any, where: str) -> str | None:
        if not isinstance(value, list):
            return f"{where} is {_show(value)}, not a list"
        return next((r for i, item in enumerate(value) if (r := checker(item, f"{where}[{i}]"))), None)

    return check


def _map_of(checker: Checker) -> Checker:
    """An object whose every value passes `checker` (JSON keys are always strings)."""

    def check(value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{where} is {_show(value)}, not an object"
        return next((r for key, item in value.items() if (r := checker(item, f"{where}.{key}"))), None)

    return check


def _object(fields: dict[str, tuple[Checker, bool]]) -> Checker:
    """An object with these fields (name -> (checker, required)); other fields pass unchecked."""

    def check(value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{where} is {_show(value)}, not an object"
        for name, (checker, required) in fields.items():
            at = f"{where}.{name}" if where else name
            if name not in value:
                if required:
                    return f"no {at}"
                continue
            if reason := checker(value[name], at):
                return reason
        return None

    return check


TEXT = _kind("a string", lambda v: isinstance(v, str))
NAME = _kind("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
FAMILY = _kind("a model family (letters, digits, _ - .)",
               lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", v) is not None)
METHOD = _kind(" / ".join(METHODS), lambda v: v in METHODS)
FLAG = _kind("true or false", lambda v: isinstance(v, bool))
COUNT = _kind("a positive integer",
              lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_COUNT)
INDEX = _kind("a non-negative integer",
              lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT)
NUMBER = _kind("a finite number", _is_number)
POSITIVE = _kind("a positive finite number", lambda v: _is_number(v) and v > 0)
SECONDS = _kind(f"a step time in seconds ({MIN_SECONDS:g} to {MAX_SECONDS:g})",
                lambda v: _is_number(v) and MIN_SECONDS <= v <= MAX_SECONDS)
BYTES = _kind("a non-negative finite number of bytes", lambda v: _is_number(v) and v >= 0)
PEAK = _kind("a positive finite number of bytes", lambda v: _is_number(v) and v > 0)
BREAKDOWN = _map_of(BYTES)  # category -> bytes
ANY_OBJECT = _kind("an object", lambda v: isinstance(v, dict))

SETTINGS = _object({
    "method": (METHOD, True), "batch_size": (COUNT, True), "seq_len": (COUNT, True),
    "r": (_nullable(COUNT), False), "alpha": (_nullable(POSITIVE), False),
    "target_modules": (_list_of(TEXT), False), "targets_asked": (_nullable(_list_of(TEXT)), False),
    "layers_to_transform": (_nullable(_list_of(INDEX)), False), "adapter_dtype": (TEXT, False),
    "dtype": (TEXT, False), "amp": (_nullable(TEXT), False), "optimizer": (TEXT, False),
    "optimizer_impl": (_nullable(TEXT), False), "grad_checkpointing": (FLAG, False), "attention": (TEXT, False),
    "steps": (COUNT, False), "gpus": (COUNT, False), "strategy": (_nullable(TEXT), False),
})
PREDICTED = _object({
    "peak_bytes": (PEAK, True), "breakdown_bytes": (BREAKDOWN, True), "peak_phase": (_nullable(TEXT), False),
    "coarse_phase": (_nullable(TEXT), False), "device_overhead_bytes": (BYTES, False),
    "peak_device_bytes": (BYTES, False),
})
PHASE = _object({"peak_bytes": (BYTES, False), "end_bytes": (BYTES, False),
                 "peak_breakdown": (BREAKDOWN, False), "end_breakdown": (BREAKDOWN, False)})
MEASURED = _object({
    "peak_bytes": (PEAK, True), "peak_phase": (_nullable(TEXT), False),
    "breakdown_bytes": (_nullable(BREAKDOWN), False),
    **{name: (_nullable(BYTES), False) for name in ("step1_peak_bytes", "steady_peak_bytes", "reserved_peak_bytes",
                                                      "non_allocator_bytes", "device_used_bytes",
                                                      "reserved_now_bytes")},
    "phases": (_nullable(_map_of(PHASE)), False),
})
SWEEP = _object({
    "grid": (_nullable(TEXT), False), "target": (_nullable(TEXT), False), "precision": (_nullable(TEXT), False),
    "torch_threads": (COUNT, False),
    "model_source": (_nullable(_object({"config": (ANY_OBJECT, False), "catalog": (TEXT, False),
                                        "path": (TEXT, False)})), False),
})
RECORD = _object({
    "key": (NAME, True), "model": (NAME, True), "family": (FAMILY, True), "backend": (NAME, True),
    "mode": (NAME, True), "settings": (SETTINGS, True), "predicted": (PREDICTED, True),
    "device": (TEXT, False), "timestamp": (TEXT, False), "error": (_nullable(TEXT), False),
    "sweep": (_nullable(SWEEP), False), "step_times_s": (_list_of(SECONDS), False),
    "median_step_time_s": (_nullable(SECONDS), False), "tokens_per_s": (_nullable(POSITIVE), False),
    "relative_error": (_nullable(NUMBER), False),
})
MEASURED_RECORD = _object({"measured": (MEASURED, True), "relative_error": (NUMBER, True)})  # status "ok"


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def check_record(record: Any) -> str | None:
    """Why `record` (a parsed JSON value) cannot be used by the report, calibrate or --resume, or None."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    if "key" not in record:
        return "not a profile record (no 'key')"
    version = record.get("schema_version")
    if isinstance(version, bool) or version not in KNOWN_SCHEMA_VERSIONS:
        return f"record schema_version {_show(version)} is not one this code reads ({KNOWN_SCHEMA_VERSIONS})"
    status = record.get("status")
    if not isinstance(status, str) or status not in STATUSES:
        return f"status {_show(status)} is not one of {', '.join(STATUSES)} (a partial record?)"
    if _too_deep(record):
        return f"nested more than {MAX_DEPTH} levels deep"
    reason = RECORD(record, "") or (MEASURED_RECORD(record, "") if status == "ok" else None)
    if reason:
        return reason
    if record["settings"]["method"] != "full" and record["settings"].get("r") is None:
        return f"no settings.r for a {record['settings']['method']} run"
    return None


# ---------------------------------------------------------------------------------------------- reading


def _line_problem(raw: bytes, last: bool) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, why the line is not JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte {err.start + 1})"
    try:
        return loads_strict(text), None
    except ValueError as err:
        if last:
            return None, "cut short: the file ends in the middle of this line (an interrupted write?)"
        if hasattr(err, "msg") and hasattr(err, "pos"):  # json.JSONDecodeError
            truncated = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
            return None, f"not JSON ({err.msg}, column {err.colno}{'; a line cut short?' if truncated else ''})"
        return None, f"not standard JSON ({err})"


def read_records(path: str | Path, field: str = "out", *, missing_ok: bool = True
                 ) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """Every valid record of a JSONL file (each with `_source` = "path:line"), and its bad lines.
    A missing file reads as empty when `missing_ok`; a file that cannot be read (a folder, a FIFO, too
    large, ...) is a one-line `PlannerInputError` naming `field`; a bad line never is."""
    name = os.fspath(path)  # as the caller spelled it: a report matches `_source` against its --runs
    if missing_ok and not os.path.lexists(path):
        return [], []
    data = read_user_bytes(path, field, READ_FIXES.get(field, READ_FIXES["runs"]), MAX_RECORDS_BYTES)
    records: list[dict[str, Any]] = []
    bad: list[BadLine] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        record, reason = _line_problem(raw, last=number == len(lines))
        reason = reason or check_record(record)
        if reason:
            bad.append(BadLine(name, number, reason))
            continue
        record["_source"] = f"{name}:{number}"
        records.append(record)
    return records, bad


def finished_keys(path: str | Path, field: str = "out") -> set[str]:
    """Keys of the valid records already in `path` (any status), for `--resume`: a bad line is not done."""
    records, _ = read_records(path, field)
    return {record["key"] for record in records}


# ---------------------------------------------------------------------------------------------- writing


def _write(fd: int, data: bytes) -> int:
    """The one low-level write of a record line (a seam: tests make it fail)."""
    return os.write(fd, data)


def _ends_with_newline(path: Path, size: int) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(size - 1)
            return handle.read(1) == b"\n"
    except OSError:  # unreadable (a write-only file): start a new line to be safe (a blank line is skipped)
        return False


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a line, on a fresh line, in one write, and make it durable before returning.
    Raises OSError when it cannot (the caller keeps the record: `RecordWriter`)."""
    path = Path(path)
    line = (dumps_strict(record, sort_keys=True) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size and not _ends_with_newline(path, info.st_size):
            line = b"\n" + line
        written = _write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


class RecordWriter:
    """Appends records to `path`; a record it cannot append is kept (stderr + a fallback file, see the
    module docstring), and so is every later one. `kept` counts them; `summary()` says where they are."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fallback: Path | None = None
        self.kept = 0

    def append(self, record: dict[str, Any]) -> bool:
        """True when the record is in `path`; False when it was kept elsewhere."""
        if self.fallback is None:
            try:
                append_record(self.path, record)
                return True
            except OSError as err:
                stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                self.fallback = fallback_path(f"lora-plan-records-{stamp}-{os.getpid()}.jsonl")
                print(f"lora-plan: cannot append to {self.path} ({err.strerror or err}): this record and the next "
                      f"ones are kept in {self.fallback} and printed on stderr", file=sys.stderr)
        self.kept += 1
        print(dumps_strict(record, sort_keys=True), file=sys.stderr, flush=True)
        try:
            append_record(self.fallback, record)
        except OSError as err:
            print(f"lora-plan: cannot write {self.fallback} either ({err.strerror or err}): the JSON line above "
                  "is the only copy of this record", file=sys.stderr)
        return False

    def summary(self) -> str | None:
        """One line for the end of the session when records were kept, else None."""
        if not self.kept:
            return None
        return (f"{self.kept} record(s) could not be appended to {self.path}; they are in {self.fallback} (and on "
                f"stderr): add them with `cat {self.fallback} >> {self.path}` once it is writable")
