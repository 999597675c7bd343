"""The one error type the planner raises for bad user input.

Every message names the offending field, says what is wrong and what to do, on one line, so the CLI
can print it as is and exit with code 2 (no traceback). Reading the user's files is `lora_planner.files`.
"""

from __future__ import annotations


class PlannerInputError(ValueError):
    """Bad input: `field` is the option or config key at fault, `fix` tells the user what to do."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")
