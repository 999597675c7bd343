"""Hypothesis profiles of the fuzz suite and the fixture every fuzz test runs under.

Profiles (chosen with `HYPOTHESIS_PROFILE`; see `tests/fuzz/__init__.py`):
- `fuzz-ci` (default): derandomized (the same cases on every run, so CI is reproducible), no shrinking (a
  failing case is reported as generated, fast), each test's `max_examples` scaled from `CI_EXAMPLES`;
  the whole of tests/fuzz in under 2 minutes on a 2-core machine;
- `fuzz-long`: random, x20 the examples, shrinking on: `HYPOTHESIS_PROFILE=fuzz-long pytest tests/fuzz`;
- `fuzz-debug`: the ci cases with shrinking, to get minimal reproductions of ci failures.

Only the fuzz tests use these settings (`fuzz_settings`), so loading them changes no other test.
"""

from __future__ import annotations

import pytest

from .fakes import patched
from .profiles import CI_EXAMPLES, active_profile, fuzz_settings  # noqa: F401 (registers the profiles)


@pytest.fixture
def fake_runs():
    """The profiler's measurement replaced by a fast fake, torch's thread count guarded (`fakes.patched`)."""
    with patched() as fake:
        yield fake
