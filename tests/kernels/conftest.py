"""The fixture every kernel test file shares."""

from __future__ import annotations

import pytest
import torch

from pruneware.kernels import dispatch


@pytest.fixture
def interpret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the test module's ops to their Triton kernels, interpreted on CPU. The module
    imports its kernel's Triton file as `fused`; that file's `_INTERPRETED` says how Triton
    built its kernels when it was imported."""
    if not request.module.fused._INTERPRETED:
        if torch.cuda.is_available():
            pytest.skip("Triton compiles for CUDA in this process; the CUDA tests cover it")
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
