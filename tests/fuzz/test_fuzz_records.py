"""Record files (real-looking records, then truncated, retyped, duplicated, NaN, deeply nested, invalid UTF-8)
read by `calibrate`, `report` and `profile --resume` (which must only append to them)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from .checks import run_case
from .corpus import RESUME_COMMANDS, record_corpus, standard_files
from .profiles import fuzz_settings
from .strategies import Case, record_lines
from .workspace import Ref, Workspace

RUNS = Ref("runs.jsonl")
RECORD_FILES = st.deferred(lambda: record_lines(record_corpus()))


def _run(case: Case, runs: bytes, fake_runs) -> None:
    case.files["runs.jsonl"] = runs
    case.fake = fake_runs.behaviour
    with Workspace() as ws:
        run_case(standard_files(case), ws)


@fuzz_settings(0.5)
@given(runs=RECORD_FILES, twice=st.booleans())
def test_fuzz_records_calibrate(runs, twice, fake_runs):
    argv = ["calibrate", "--runs", RUNS, "--out", Ref("calib_out")] + (["--runs", RUNS] if twice else [])
    _run(Case("calibrate", argv), runs, fake_runs)


@fuzz_settings(0.15)
@given(runs=RECORD_FILES)
def test_fuzz_records_report(runs, fake_runs):
    _run(Case("report", ["report", "--runs", RUNS, "--out", Ref("report_dir")]), runs, fake_runs)


@fuzz_settings(0.5)
@given(runs=RECORD_FILES, command=st.sampled_from(RESUME_COMMANDS), as_json=st.booleans(),
       fake=st.sampled_from(("ok", "ok", "oom", "error")))
def test_fuzz_records_profile_resume(runs, command, as_json, fake, fake_runs):
    fake_runs.behaviour = fake
    case = Case("profile", [*command, "--out", RUNS, "--resume"] + (["--json"] if as_json else []), records=[RUNS])
    _run(case, runs, fake_runs)
