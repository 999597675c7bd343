"""`lora-plan profile`: one run per method, records appended as they finish, progress per step, a table.

Progress goes to stderr (`progress.RunProgressDisplay`: a live display on a terminal, a line per
finished step otherwise), so stdout holds only the table, or the records with `--json`.

Long runs survive failure: an out-of-memory run is recorded as `"status": "oom"` and the next one
starts; Ctrl-C stops after the records already written (each is on disk the moment its run ends);
`--resume` skips runs whose key is already in the output file (valid records only: a broken line's
run is run again).

Nothing measured is lost: `--out` is checked (`files.check_output_file`) before the first step, and a
record that still cannot be appended (disk full, the file replaced meanwhile) is kept on stderr and in a
fallback file (`records.RecordWriter`); the session then finishes its runs and exits 1.

A run's key and record hold the model's label (`model_label`): the catalog's name for a catalog model
(any alias, repo id or case: `meta-llama/Llama-2-7b-hf` -> `llama-2-7b`), else the config path
normalised (`./cfg//x.json` -> `cfg/x.json`), so `--resume` does not depend on how it was typed.
Known limitation: an absolute and a relative path to one config are two labels.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from typing import Any

import torch
from rich.console import Console

from lora_planner.catalog import model_names
from lora_planner.files import check_output_file
from lora_planner.profiler.progress import RunProgressDisplay
from lora_planner.profiler.records import RecordWriter, finished_keys
from lora_planner.profiler.runner import ProfileRequest, check_request, resolve_mode, run_profile
from lora_planner.specs import ModelSpec, TrainingSpec

EXIT_INTERRUPTED = 130


def model_label(model: str, spec: ModelSpec) -> str:
    """The label a run's key and record carry for `--model model` (resolved to `spec`): the catalog's
    name for a catalog model, else the config path as `os.path.normpath` writes it."""
    return spec.name if spec.name in model_names() else os.path.normpath(model)


def build_requests(model: str, spec: ModelSpec, trainings: list[TrainingSpec], backend: str, mode: str,
                   steps: int) -> list[ProfileRequest]:
    """Resolve `auto` per run and align the training's device with the mode, so the optimizer
    implementation the run uses is the one the prediction assumes; label the model (`model_label`)."""
    model = model_label(model, spec)
    requests = []
    for training in trainings:
        # Several GPUs are measured as CPU processes on gloo (lora_planner.profiler.distributed).
        concrete = "cpu" if training.gpus > 1 and mode == "auto" else resolve_mode(mode, spec, training)
        device = "cuda" if concrete == "cuda" else "cpu"
        requests.append(ProfileRequest(model=model, spec=spec, training=replace(training, device=device),
                                       backend=backend, mode=concrete, steps=steps))
    return requests


def profile_session(model: str, spec: ModelSpec, trainings: list[TrainingSpec], *, backend: str, mode: str,
                    steps: int, out: str, resume: bool, as_json: bool, console: Console | None = None,
                    progress_console: Console | None = None, threads: int | None = None) -> int:
    console = console or Console(stderr=as_json)
    if threads is not None:
        torch.set_num_threads(threads)  # as `lora-plan sweep --threads`: records carry the thread count
    requests = build_requests(model, spec, trainings, backend, mode, steps)
    done = finished_keys(out) if resume else set()
    todo = [r for r in requests if r.key not in done]
    for request in todo:  # bad settings fail now, not after the runs before them
        check_request(request)
    check_output_file(out, "out")  # and a bad --out now, not after the measurements
    if len(todo) < len(requests):
        console.print(f"resume: {len(requests) - len(todo)} run(s) already in {out}, skipped")
    records: list[dict[str, Any]] = []
    writer = RecordWriter(out)
    try:
        with RunProgressDisplay(len(todo), progress_console or Console(stderr=True)) as display:
            for request in todo:
                t = request.training
                callback = display.run(f"{t.method} {request.backend}/{request.mode} b={t.batch_size} s={t.seq_len}")
                record = run_profile(request, progress=callback)
                writer.append(record)
                records.append(record)
                display.finished(record)
    except KeyboardInterrupt:
        where = f"{out}" + (f" and {writer.fallback}" if writer.kept else "")
        console.print(f"interrupted: {len(records)} finished record(s) are in {where}", highlight=False)
        return EXIT_INTERRUPTED
    if as_json:
        print(json.dumps(records, indent=2))
    elif records:
        from lora_planner.render_profile import profile_table

        console.print(profile_table(records))
        if len(records) > writer.kept:
            console.print(f"records appended to {out}", style="dim")
    if writer.kept:
        print(f"lora-plan: {writer.summary()}", file=sys.stderr)
        return 1
    return 0 if all(r["status"] != "error" for r in records) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `lora-plan profile`")
