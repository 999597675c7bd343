"""Calibration files (the one `calibrate` writes, with negative, non-numeric, huge or non-finite overheads and
factors, keys deleted or retyped, broken text) applied by `estimate --calibration` and `recommend --calibration`."""

from __future__ import annotations

from hypothesis import given, strategies as st

from .checks import run_case
from .corpus import calibration_base, standard_files
from .profiles import fuzz_settings
from .strategies import argv_for, calibration_text
from .workspace import Ref, Workspace

CALIB = Ref("calib.json")
CALIBRATIONS = st.deferred(lambda: calibration_text(calibration_base()))


def _run(case, calib, fake_runs):
    case.files["calib.json"] = calib
    with Workspace() as ws:
        run_case(standard_files(case), ws)


@fuzz_settings(0.5)
@given(calib=CALIBRATIONS, case=argv_for("estimate", hostile_ok=False, fixed={"calibration": CALIB}))
def test_fuzz_calibration_estimate(calib, case, fake_runs):
    _run(case, calib, fake_runs)


@fuzz_settings(0.3)
@given(calib=CALIBRATIONS, case=argv_for("recommend", hostile_ok=False, fixed={"calibration": CALIB, "json": True}))
def test_fuzz_calibration_recommend(calib, case, fake_runs):
    _run(case, calib, fake_runs)
