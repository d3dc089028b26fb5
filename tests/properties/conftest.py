"""Hypothesis profiles for the property-based suite.

`ci` (the default) is derandomized: the same examples on every run, so CI is reproducible and
its time bounded. `long` draws fresh examples, ten times as many per property:

    python -m pytest -q tests/properties --hypothesis-profile=long
    PRUNEWARE_HYPOTHESIS=long python -m pytest -q tests/properties   # the same, as an env var
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # 2 shared cores: a tiny-model forward can take a second
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,  # a failure prints the @reproduce_failure line that replays it
)
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=100, **_COMMON)


def pytest_configure(config) -> None:
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(os.environ.get("PRUNEWARE_HYPOTHESIS", "ci"))
