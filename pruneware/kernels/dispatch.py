"""Backend choice shared by every kernel op.

Each op under ``pruneware/kernels/<op>/`` has a plain-torch ``reference.py``
and a Triton ``triton.py``. Its ``__init__`` asks :func:`choose_backend` which
one to call:

* by default, Triton when every tensor lives on a CUDA device and Triton is
  importable, the reference otherwise;
* ``PRUNEWARE_KERNELS=reference`` forces the reference everywhere;
* ``PRUNEWARE_KERNELS=triton`` forces Triton, even on CPU tensors. That only
  works under ``TRITON_INTERPRET=1`` and is how the tests run the kernels
  without a GPU.

The variable is read at every call, so tests can flip it with ``monkeypatch``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

BACKEND_ENV = "PRUNEWARE_KERNELS"
Backend = Literal["triton", "reference"]
_CHOICES = ("auto", "reference", "triton")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def forced_backend() -> Backend | None:
    """The backend forced by ``PRUNEWARE_KERNELS``, or None when unset or ``auto``."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in _CHOICES:
        raise ValueError(
            f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not a valid kernel backend; "
            f"expected one of {', '.join(_CHOICES)}"
        )
    if value == "triton" and not triton_available():
        raise ValueError(f"{BACKEND_ENV}=triton but the triton package is not installed")
    return value  # type: ignore[return-value]


def choose_backend(*tensors: torch.Tensor | None) -> Backend:
    """Pick the backend for one kernel call on ``tensors`` (None entries are ignored)."""
    forced = forced_backend()
    if forced is not None:
        return forced
    present = [t for t in tensors if t is not None]
    if present and all(t.is_cuda for t in present) and triton_available():
        return "triton"
    return "reference"
