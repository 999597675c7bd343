"""Mutated config.json files (real catalog and tiny configs: keys retyped, deleted, absurd sizes, broken text)
passed as `--model PATH` to estimate, recommend and profile."""

from __future__ import annotations

from hypothesis import given, strategies as st

from .checks import run_case
from .corpus import standard_files
from .profiles import fuzz_settings
from .strategies import argv_for, config_text
from .workspace import Ref, Workspace

CONFIG = Ref("config.json")


def _run(case, config, fake_runs):
    case.files["config.json"] = config
    case.fake = fake_runs.behaviour
    with Workspace() as ws:
        run_case(standard_files(case), ws)


@fuzz_settings(0.8)
@given(config=config_text(), case=argv_for("estimate", hostile_ok=False, fixed={"model": CONFIG, "calibration": None,
                                                                                 "json": True}))
def test_fuzz_config_estimate(config, case, fake_runs):
    _run(case, config, fake_runs)


@fuzz_settings(0.4)
@given(config=config_text(), case=argv_for("recommend", hostile_ok=False, fixed={"model": CONFIG, "json": True,
                                                                                  "calibration": None}))
def test_fuzz_config_recommend(config, case, fake_runs):
    _run(case, config, fake_runs)


@fuzz_settings(0.25)
@given(config=config_text(), mode=st.sampled_from(("cpu", "fake")),
       case=argv_for("profile", hostile_ok=False, fixed={"model": CONFIG, "threads": None, "json": True,
                                                          "mode": None, "steps": "1"}))
def test_fuzz_config_profile(config, mode, case, fake_runs):
    case.argv += ["--mode", mode]
    _run(case, config, fake_runs)
