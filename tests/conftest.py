"""Shared pytest fixtures for the pruneware test suite."""

from __future__ import annotations

import os

import pytest
import torch

# Triton 3.8 picks interpreter or compiler once, when triton is first imported,
# and torch/transformers import it early. So the flag that lets Triton kernels
# run on CPU must be set here, before any test module loads; only without CUDA,
# where nothing could be compiled anyway.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``torch.empty`` and ``torch.empty_like`` return NaN-filled float tensors.

    A kernel output that starts from ``torch.empty`` and is left partly
    unwritten then shows up as NaN instead of passing by luck on zeroed memory.
    Integer and bool tensors are returned unchanged.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
