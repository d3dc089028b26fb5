"""Every test here leaves no pruneware request state in the thread's context (tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _no_request_state_left(sessions_leave_nothing):
    yield
