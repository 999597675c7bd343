"""Every file the user hands the tool, read and written one way: bounded, regular files only, one-line errors.

Reading (`read_user_bytes`, `read_user_text`, `read_json_file`): only regular files are opened (a FIFO or a
device would block or never end), checked with `os.stat` before opening and opened non-blocking, so even a
FIFO swapped in between cannot hang; each kind of file has a size bound (`MAX_*_BYTES`) far above any real
one. Every failure (missing, a folder, too long a name, not UTF-8, not JSON, JSON nested past Python's
recursion limit) is a `PlannerInputError` naming the option and the path.

Writing (`check_output_file`, `check_output_dir`): an output path is checked *before* any work starts
(the parent can be created, the path is not a folder or something else than a regular file, the file can
be opened for appending), so a run's measurements are never thrown away because `--out` was wrong.

Known limitations: a disk that fills up after the check is only noticed when writing; callers that write
records keep them (stderr and `fallback_path`) when that happens.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError

KIB, MIB, GIB = 2**10, 2**20, 2**30
MAX_CONFIG_BYTES = 16 * MIB  # a config.json is a few KiB; tokenizer-sized files are not configs
MAX_SMALL_FILE_BYTES = 16 * MIB  # grids, calibration files, training configs
MAX_RECORDS_BYTES = 2 * GIB  # JSONL records: ~5 KiB each, so some 400,000 runs


def _describe(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "the file name is too long"
    return err.strerror or str(err)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_user_bytes(path: str | Path, field: str, fix: str, max_bytes: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, or a one-line `PlannerInputError` naming `field`."""
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise PlannerInputError(field, f"{_short(path)} is {_kind(info.st_mode)}, not a regular file", fix)
        if info.st_size > max_bytes:
            raise PlannerInputError(field, f"{_short(path)} is {info.st_size:,} bytes, more than the {max_bytes:,} a "
                                           "file of this kind can be", fix)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the stat
                raise PlannerInputError(field, f"{_short(path)} is not a regular file", fix)
            with os.fdopen(fd, "rb") as handle:
                fd = -1
                data = handle.read(max_bytes + 1)
        finally:
            if fd >= 0:
                os.close(fd)
    except PlannerInputError:
        raise
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL in the path
        problem = _describe(err) if isinstance(err, OSError) else str(err)
        raise PlannerInputError(field, f"cannot read {_short(path)} ({problem})", fix) from None
    if len(data) > max_bytes:
        raise PlannerInputError(field, f"{_short(path)} grew past {max_bytes:,} bytes while being read", fix)
    return data


def read_user_text(path: str | Path, field: str, fix: str, max_bytes: int = MAX_SMALL_FILE_BYTES) -> str:
    data = read_user_bytes(path, field, fix, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PlannerInputError(field, f"{_short(path)} is not UTF-8 text (byte {err.start})", fix) from None


def read_json_file(path: str | Path, field: str, fix: str, max_bytes: int = MAX_SMALL_FILE_BYTES) -> Any:
    """A JSON file's content, or a `PlannerInputError` naming `field` when it cannot be read or parsed.
    Standard JSON only: `NaN` / `Infinity` are refused."""
    data = read_user_bytes(path, field, fix, max_bytes)
    try:
        return loads_strict(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise PlannerInputError(field, f"{_short(path)} is not valid JSON (not UTF-8 text, byte {err.start})",
                                fix) from None
    except ValueError as err:
        raise PlannerInputError(field, f"{_short(path)} is not valid JSON ({err})", fix) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` of standard JSON: NaN / Infinity refused, nesting past the recursion limit a ValueError."""
    try:
        import json  # lazily: the estimate path reads no JSON for a catalog model (cold start, issue 11)

        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that refuses NaN / Infinity (they are not JSON) instead of writing them."""
    import json

    return json.dumps(value, allow_nan=False, **kwargs)


def _short(path: Path, limit: int = 120) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def _file_above(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is not a folder (a path "under a file"), if any."""
    for parent in path.parents:
        try:
            if parent.exists():
                return None if parent.is_dir() else parent
        except OSError:
            return None
    return None


def check_output_file(path: str | Path, field: str = "out") -> Path:
    """Make sure records can be appended to `path` before any work starts: create its folder, refuse a folder
    or a non-regular file, open it for appending (creating it empty if new). Returns the path."""
    path = Path(path)
    fix = f"pass --{field} a writable file path, e.g. runs.jsonl"
    if str(path) == "":
        raise PlannerInputError(field, "empty path", fix)
    try:
        if path.exists() and not path.is_file():
            raise PlannerInputError(field, f"{_short(path)} is {_kind(os.stat(path).st_mode)}, not a file", fix)
        above = _file_above(path)
        if above is not None:
            raise PlannerInputError(field, f"{_short(path)} lies under {_short(above)}, which is a file", fix)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
        os.close(fd)
    except PlannerInputError:
        raise
    except (OSError, ValueError) as err:
        problem = _describe(err) if isinstance(err, OSError) else str(err)
        raise PlannerInputError(field, f"cannot write {_short(path)} ({problem})", fix) from None
    return path


def check_output_dir(path: str | Path, field: str = "out") -> Path:
    """Make sure `path` is (or can be made) a writable folder before any work starts."""
    path = Path(path)
    fix = f"pass --{field} a writable folder"
    if str(path) == "":
        raise PlannerInputError(field, "empty path", fix)
    try:
        if path.exists() and not path.is_dir():
            raise PlannerInputError(field, f"{_short(path)} exists and is not a folder", fix)
        above = _file_above(path)
        if above is not None:
            raise PlannerInputError(field, f"{_short(path)} lies under {_short(above)}, which is a file", fix)
        path.mkdir(parents=True, exist_ok=True)
        import tempfile  # lazily: only on this path (cold start, issue 11)
        with tempfile.TemporaryFile(dir=path):
            pass
    except PlannerInputError:
        raise
    except (OSError, ValueError) as err:
        problem = _describe(err) if isinstance(err, OSError) else str(err)
        raise PlannerInputError(field, f"cannot write in {_short(path)} ({problem})", fix) from None
    return path


def fallback_path(name: str) -> Path:
    """Where records go when their output file cannot be written: the system's temp folder."""
    import tempfile  # lazily: only on this path (cold start, issue 11)
    return Path(tempfile.gettempdir()) / name
