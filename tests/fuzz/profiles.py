"""The fuzz suite's hypothesis profiles (documented in `conftest.py`)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings


CI_EXAMPLES = 40
_COMMON = dict(deadline=None, print_blob=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.large_base_example])
settings.register_profile("fuzz-ci", max_examples=CI_EXAMPLES, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.register_profile("fuzz-debug", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("fuzz-long", max_examples=20 * CI_EXAMPLES, **_COMMON)


def active_profile() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "fuzz-ci")
    return name if name.startswith("fuzz-") else "fuzz-ci"


def fuzz_settings(share: float) -> settings:
    """The active fuzz profile with `share` x its max_examples (each test's share of the suite's cases)."""
    profile = settings.get_profile(active_profile())
    base = int(os.environ.get("FUZZ_EXAMPLES", profile.max_examples))  # a test's examples = base x its share
    return settings(profile, max_examples=max(1, round(base * share)))


