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

from lora_planner.cli_types import MAX_SEED, Text, count, fraction


def add_calibrate_arguments(p: Any) -> None:
    """`lora-plan calibrate` arguments (an argparse parser)."""
    p.add_argument("--runs", action="append", type=Text("runs", "--runs runs.jsonl"), required=True,
                   help="JSONL profile records (repeatable)")
    p.add_argument("--out", type=Text("out", "--out calib.json"), required=True,
                   help="calibration file to write, e.g. calib.json")
    p.add_argument("--holdout", type=fraction("holdout", "--holdout 0.3", zero=True, one=False), default=0.3,
                   help="fraction of each family/method's measured runs held out to check its factor (default 0.3); "
                        "a factor is applied only when it lowers their error, and nothing is written when no run "
                        "can be held out or nothing is applied")
    p.add_argument("--seed", type=count("seed", "--seed 0", MAX_SEED, low=0), default=0, help="seed of the held-out split (default 0)")


def add_report_arguments(p: Any) -> None:
    """`lora-plan report` arguments (an argparse parser)."""
    p.add_argument("--runs", action="append", type=Text("runs", "--runs runs.jsonl"), required=True,
                   help="JSONL profile records (repeatable)")
    p.add_argument("--out", type=Text("out", "--out reports/cpu"), required=True,
                   help="folder for report.md and its PNG charts")
    p.add_argument("--model", type=Text("model", "--model llama-3-8b"), default="llama-3-8b",
                   help="model of the planner's own charts (breakdown, rank, batch, sequence; default llama-3-8b)")


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
