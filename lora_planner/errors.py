"""The one error type the planner raises for bad user input.

Every message names the offending field, says what is wrong and what to do, on one line, so the CLI
can print it as is and exit with code 2 (no traceback). `read_json_file` reads user JSON that way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class PlannerInputError(ValueError):
    """Bad input: `field` is the option or config key at fault, `fix` tells the user what to do."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


def read_json_file(path: Path, field: str, fix: str) -> Any:
    """A JSON file's content, or a `PlannerInputError` naming `field` when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PlannerInputError(field, f"cannot read {path} ({err.strerror or err})", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlannerInputError(field, f"{path} is not valid JSON ({err})", fix) from None
