"""Showing profile runs as they go (`lora-plan profile`, `lora-plan sweep`), on stderr.

The runner reports `RunProgress` events through a callback and knows nothing of the display; this
module turns them into a rich live display (run i/N, the stage's step j/steps, elapsed time) when
stderr is a terminal, or one plain line per finished step otherwise (logs, CI, `2> progress.log`).
Either way stdout keeps only the table or the JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from lora_planner.profiler.runner import ProgressCallback, RunProgress

STAGE_TEXT = {"build": "building the model", "measure": "measured step", "time": "timed step",
              "breakdown": "tracked step"}


def describe(event: RunProgress) -> str:
    """'measured step 2/3', 'building the model'."""
    text = STAGE_TEXT.get(event.stage, event.stage)
    return f"{text} {event.step}/{event.steps}" if event.steps else text


class RunProgressDisplay:
    """Use as a context manager; `run(label)` gives the callback for one run, `finished(record)` closes it."""

    def __init__(self, total_runs: int, console: Console | None = None, title: str = "profiling",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.console = console or Console(stderr=True)
        self.total_runs = total_runs
        self.title = title
        self._clock = clock
        self._index = 0
        self._label = ""
        self._run_start = 0.0
        self._live = self.console.is_terminal
        self._progress: Progress | None = None
        self._runs_task: TaskID | None = None
        self._steps_task: TaskID | None = None

    def __enter__(self) -> RunProgressDisplay:
        if self._live:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._progress.start()
            self._runs_task = self._progress.add_task(self.title, total=self.total_runs)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def run(self, label: str) -> ProgressCallback:
        """Start run `label` (the next of `total_runs`) and return the callback its events go to."""
        self._index += 1
        self._label = label
        self._run_start = self._clock()
        if self._progress is not None:
            self._progress.update(self._runs_task, description=f"run {self._index}/{self.total_runs} {label}")
            if self._steps_task is not None:
                self._progress.remove_task(self._steps_task)
            self._steps_task = self._progress.add_task("  starting", total=None)  # its clock is the run's
        return self._on_event

    def finished(self, record: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.advance(self._runs_task)
            return
        self._line(f"done, {record.get('status', '?')}")

    def _on_event(self, event: RunProgress) -> None:
        text = STAGE_TEXT.get(event.stage, event.stage)
        if self._progress is not None:
            total = event.steps or None
            self._progress.update(self._steps_task, description=f"  {text}", total=total, completed=event.step)
            return
        if event.stage == "build" or event.step > 0:  # events with step 0 say a stage begins: no line
            self._line(describe(event))

    def _line(self, what: str) -> None:
        elapsed = self._clock() - self._run_start
        self.console.print(f"run {self._index}/{self.total_runs} {self._label}: {what} ({elapsed:.1f} s)",
                           highlight=False, soft_wrap=True)
