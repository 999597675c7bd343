"""The validation reports' writer, shared by `dpo_runs.py` and `grpo_runs.py`: each run's rows as JSON, and a Markdown
table of the setting cells and, per phase, the measured peak and the planner's error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_validation(name: str, rows: list[dict], columns: list[str], cells: Callable[[dict], list[str]],
                     phases: tuple[str, ...]) -> str:
    """Write reports/objectives/{name}.json and .md; return the Markdown table."""
    out = ROOT / "reports" / "objectives"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| " + " | ".join(columns + [f"{p} (measured, error)" for p in phases]) + " |",
             "|" + "---|" * (len(columns) + len(phases))]
    for r in rows:
        measured = [f"{r['phases'][p]['measured_bytes'] / 2**20:.2f} MiB, {r['phases'][p]['error_pct']:+.2f} %"
                    if p in r["phases"] else "-" for p in phases]
        lines.append("| " + " | ".join(cells(r) + measured) + " |")
    table = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(table)
    return table
