"""Counting the host-side cost of a forward: host syncs and torch calls, by who makes them.

For `benchmarks/launch_budget.py` and the sync-budget test; counts, never times, so they are
deterministic. Not part of the public API, and never active unless a caller opens one of these
contexts (importing this module patches nothing).

Who makes a call is read from the innermost Python frame outside torch:
  - "policy": a policy's own scoring: `pruneware/policies/`, the score kernel, and
    `attention_policy_scores`, which feeds that kernel the captured rows;
  - "engine": any other pruneware code (session, levels, masks, the stage runner, the gather kernel...);
  - "model": everything else (transformers' own code, the caller).
"""

from __future__ import annotations

import collections
import os
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that bring a value to the host: each waits for the device on a GPU.
SYNC_METHODS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
# Torch calls that read metadata only: no op, no launch.
METADATA_CALLS = ("__get__", "shape", "dtype", "device", "is_cuda", "numel", "dim", "size", "__len__", "ndim",
                  "is_floating_point")
PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # pruneware's own files, wherever it is installed
POLICY_DIRS = tuple(os.path.join(PACKAGE_DIR, *part.split("/")) + os.sep for part in ("policies", "kernels/scores"))
POLICY_FUNCTIONS = ("attention_policy_scores",)  # engine/stage_inputs.py: a policy's attention scores from q, k


def owner(stack: list[traceback.FrameSummary]) -> str:
    """"engine", "policy" or "model": who made the call whose Python stack is `stack` (outermost first)."""
    for frame in reversed(stack):
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        if not frame.filename.startswith(PACKAGE_DIR):
            return "model"
        scoring = frame.filename.startswith(POLICY_DIRS) or frame.name in POLICY_FUNCTIONS
        return "policy" if scoring else "engine"
    return "model"


@contextmanager
def count_host_syncs() -> Iterator[collections.Counter]:
    """While inside, count host syncs (calls of `SYNC_METHODS` on a tensor) by owner.

    Yields a Counter with keys "engine", "policy", "model" and "total". Patches `torch.Tensor`
    for the duration only, and restores it on errors too.
    """
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    inside = threading.local()  # a sync that calls another (e.g. through a torch function mode) counts once

    def wrap(fn):
        def counted(self, *args, **kwargs):
            if getattr(inside, "active", False):
                return fn(self, *args, **kwargs)
            counts[owner(traceback.extract_stack(limit=16)[:-1])] += 1
            counts["total"] += 1
            inside.active = True
            try:
                return fn(self, *args, **kwargs)
            finally:
                inside.active = False

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class TorchCallCounter(TorchFunctionMode):
    """Torch calls made from Python while active, by owner (metadata reads are not counted).

    An upper bound on the aten ops the engine launches: it also counts calls such as views
    that launch nothing. Use as a context manager; `counts` is a Counter keyed by owner.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        if getattr(func, "__name__", "") not in METADATA_CALLS:
            self.counts[owner(traceback.extract_stack(limit=16)[:-1])] += 1
        return func(*args, **(kwargs or {}))
