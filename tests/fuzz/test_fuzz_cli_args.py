"""Argument vectors of every subcommand, from the real option tables (valid, boundary and hostile values)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from .checks import run_case
from .corpus import standard_files
from .profiles import fuzz_settings
from .strategies import SUBCOMMANDS, argv_for, option_tables
from .workspace import Workspace

# Each subcommand's share of the ci profile's examples (report builds charts: the slowest).
SHARES = {"estimate": 1.0, "profile": 0.6, "recommend": 0.8, "sweep": 0.3, "calibrate": 0.4, "report": 0.15,
          "models": 0.1, "serve": 0.1}


def test_option_tables_cover_every_subcommand():
    tables = option_tables()
    assert set(tables) == set(SUBCOMMANDS)
    assert all(any(o.strings for o in options) for options in tables.values())


def _fuzz(sub: str):
    @fuzz_settings(SHARES[sub])
    @given(case=argv_for(sub), fake=st.sampled_from(("ok", "ok", "oom", "error")))
    def test(case, fake, fake_runs):
        case.fake = fake_runs.behaviour = fake
        with Workspace() as ws:
            run_case(standard_files(case), ws)

    test.__name__ = f"test_fuzz_{sub}_arguments"
    return test


for _sub in SUBCOMMANDS:
    globals()[f"test_fuzz_{_sub}_arguments"] = _fuzz(_sub)
