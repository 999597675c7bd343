"""Reports and calibration from profile records (`lora-plan report`, `lora-plan calibrate`).

- `runs`: read and check JSONL records from several files; bad lines are named, never fatal (pure);
- `calibrate`: fit the planner's free constants to measured runs, keep only what lowers the held-out
  error, and apply them to an estimate (pure: `lora-plan estimate --calibration` imports it, so it
  stays free of pandas and torch);
- `tables`: records and planner grids as pandas DataFrames, error summaries;
- `charts`: matplotlib figures (Agg, no display) from those DataFrames;
- `claims`: the seed's rules of thumb checked against measurements and the planner;
- `markdown`: a small Markdown table renderer (no `tabulate` needed);
- `build`: the report itself (PNGs + Markdown) for `lora-plan report`.

This package's `__init__` holds only the subcommands' arguments and handlers and imports nothing heavy,
so `lora-plan estimate --calibration` (which imports `calibrate`) stays light.
"""

from typing import Any


def run_calibrate_command(args: Any) -> int:
    from lora_planner.report.calibrate import calibrate_command

    return calibrate_command(args)


def run_report_command(args: Any) -> int:
    from lora_planner.errors import PlannerInputError

    try:
        from lora_planner.report.build import report_command
    except ImportError as err:
        raise PlannerInputError("report", f"reports need pandas and matplotlib ({err.name} is missing)",
                                'pip install -e ".[report]"') from None
    return report_command(args)
