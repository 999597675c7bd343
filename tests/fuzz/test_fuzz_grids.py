"""Sweep grids (the tiny valid one, random valid axes, mutated ones, broken TOML): `sweep --dry-run`, and real
sweeps under the fake measurement into a new or an existing record file."""

from __future__ import annotations

from hypothesis import given, strategies as st

from .checks import run_case
from .corpus import standard_files
from .profiles import fuzz_settings
from .strategies import Case, grid_text
from .workspace import Ref, Workspace

GRID = Ref("grid.toml")


def _run(case: Case, grid: str | bytes, fake: str, fake_runs) -> None:
    case.files["grid.toml"] = grid
    case.fake = fake_runs.behaviour = fake
    with Workspace() as ws:
        run_case(standard_files(case), ws)


@fuzz_settings(0.6)
@given(grid=grid_text())
def test_fuzz_grid_dry_run(grid, fake_runs):
    _run(Case("sweep", ["sweep", GRID, "--out", Ref("out_new"), "--dry-run"]), grid, "ok", fake_runs)


@fuzz_settings(0.3)
@given(grid=grid_text(), out=st.sampled_from(("out_new", "runs.jsonl")), limit=st.sampled_from(("1", "2", None)),
       fake=st.sampled_from(("ok", "ok", "oom", "error")))
def test_fuzz_grid_run(grid, out, limit, fake, fake_runs):
    argv = ["sweep", GRID, "--out", Ref(out)] + (["--resume"] if out == "runs.jsonl" else [])
    argv += ["--limit", limit] if limit else []
    _run(Case("sweep", argv), grid, fake, fake_runs)
