"""Real-looking inputs the strategies start from (built once per process and cached):

- `profile_lines()`: records written by `lora-plan profile` itself (under the fake measurement) for the
  `RESUME_COMMANDS`, so `--resume` on a mutated copy meets keys it knows;
- `synthetic_lines()`: records of `tests.report.synthetic.biased_records` (activations off by a known
  factor, some cuda records with reserved / non-allocator memory), which `calibrate` can fit;
- `repo_lines()`: the first lines of the repository's own `reports/**/*.jsonl`, when present;
- `calibration_base()`: the calib.json `lora-plan calibrate` writes for the synthetic records;
- `standard_files(case)`: every file an argument vector may name (a valid calib.json, runs.jsonl, grid.toml),
  and which of them are record files (appended to) or inputs (left alone).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tests.report.synthetic import biased_records

from .strategies import Case, base_grid, toml_doc
from .workspace import Ref

REPO = Path(__file__).resolve().parents[2]
# Profile commands whose records make up `profile_lines()` (and that the resume test replays).
RESUME_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("profile", "--model", "tinyllama-1.1b", "--method", "full,lora", "--backend", "builtin", "--mode", "cpu",
     "--steps", "1", "--seq-len", "16", "--device", "cpu"),
    ("profile", "--model", "gpt2", "--method", "lora", "--mode", "fake", "--steps", "2", "--seq-len", "32"),
    ("profile", "--model", "config.json", "--method", "full", "--mode", "cpu", "--steps", "1", "--seq-len", "16",
     "--batch-size", "2"),
)


@functools.lru_cache(maxsize=None)
def profile_lines() -> tuple[str, ...]:
    from .fakes import patched
    from .checks import run_cli
    from .workspace import Workspace

    lines: list[str] = []
    with patched(), Workspace() as ws:
        for command in RESUME_COMMANDS:
            outcome = run_cli([*command, "--out", "runs.jsonl"], ws.root)
            if outcome.code not in (0, 1):
                continue  # the resume test reports it; the other lines are still worth fuzzing with
        data = ws.snapshot("runs.jsonl") or b""
    lines += [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return tuple(lines)


def _synthetic() -> list[dict]:
    records = biased_records(6, 1.3, prefix="a") + biased_records(5, 0.8, method="full", prefix="f")
    records += biased_records(4, 1.1, family="qwen2", prefix="q", mode="cuda", reserved=2**30, non_allocator=2**29)
    return records


@functools.lru_cache(maxsize=None)
def synthetic_lines() -> tuple[str, ...]:
    return tuple(json.dumps(r, sort_keys=True) for r in _synthetic())


@functools.lru_cache(maxsize=None)
def repo_lines(per_file: int = 12) -> tuple[str, ...]:
    lines: list[str] = []
    for path in sorted((REPO / "reports").glob("**/*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as handle:
            lines += [line.rstrip("\n") for _, line in zip(range(per_file), handle) if line.strip()]
    return tuple(lines)


def record_corpus() -> tuple[str, ...]:
    return profile_lines() + synthetic_lines() + repo_lines()


@functools.lru_cache(maxsize=None)
def calibration_base() -> dict:
    from lora_planner.report.calibrate import fit_calibration

    calib = fit_calibration([{**r, "_source": f"runs.jsonl:{i}"} for i, r in enumerate(_synthetic(), 1)],
                            sources=["runs.jsonl"])
    return json.loads(json.dumps(calib))


RECORD_FILES = ("runs.jsonl", "out_new")


def standard_files(case: Case) -> Case:
    """`case` with the default content of every workspace file it has not set, and the record / input
    files the checks watch."""
    defaults = {"runs.jsonl": "".join(line + "\n" for line in synthetic_lines() + profile_lines()),
                "calib.json": json.dumps(calibration_base(), indent=2) + "\n",
                "grid.toml": toml_doc(base_grid())}
    for name, content in defaults.items():
        case.files.setdefault(name, content)
    writes_records = case.sub in ("profile", "sweep")
    outs = [Ref(name) for name in RECORD_FILES]
    for i, token in enumerate(case.argv):  # whatever --out names (e.g. a file called "NaN") is a record file
        if token == "--out" and i + 1 < len(case.argv):
            outs.append(case.argv[i + 1])
        elif isinstance(token, str) and token.startswith("--out="):
            outs.append(token[len("--out="):])
    for token in outs if writes_records else ():
        if token not in case.records and token not in ("", "/dev/zero"):
            case.records.append(token)
    for name in ("calib.json", "config.json", "grid.toml", "unicode") + (() if writes_records else ("runs.jsonl",)):
        if Ref(name) not in case.read_only and Ref(name) not in case.records:
            case.read_only.append(Ref(name))
    return case
