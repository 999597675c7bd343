"""The fuzz suite of issue 10: hypothesis generates argument vectors (from the real option tables of
`lora_planner.cli_args.build_parser()`), configs, grids, record files and calibration files, runs
`lora_planner.cli.main(argv)` in-process and holds every answer to the CLI's contract
(`tests/fuzz/checks.py`): no traceback, no hang, exit 0 or 2 with one `lora-plan: error: ` line,
standard JSON with finite, non-negative byte counts whose breakdowns sum to their peak, record files
only ever appended to.

Running it:

    .venv/bin/python -m pytest -q tests/fuzz                                   # "fuzz-ci": derandomized, a few hundred cases, < 2 min
    HYPOTHESIS_PROFILE=fuzz-long .venv/bin/python -m pytest -q tests/fuzz      # thousands of cases, random seed, shrinking on
    HYPOTHESIS_PROFILE=fuzz-debug .venv/bin/python -m pytest -q tests/fuzz -x  # the ci cases, with shrinking (minimal repros)
    .venv/bin/python -m tests.fuzz.survey [N]                                  # every distinct contract violation, deduplicated

`FUZZ_EXAMPLES` overrides the profile's base number of examples (each test runs a share of it; ci: 40, about
300 cases in all). `FUZZ_CASE_TIMEOUT` (seconds, default 30) is the watchdog of one `main(argv)` call: a hang fails the
case instead of hanging CI. No torch model is ever built: `conftest.py` replaces the profiler's
measurement (`lora_planner.profiler.runner.MEASURE`, `measure_ranks`) with a fast fake; validation,
record building and appending stay real.
"""
