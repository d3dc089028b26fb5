"""The engine's host syncs per stage (deterministic counts, no timing): reading a tensor's value
on the host (`.item()`, `.tolist()`, `.cpu()`, `int()`, `float()`, `bool()`) waits for the GPU,
and at batch 1 every wait shows in time to first token. A policy's own scoring is not counted."""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import pytest
import torch

import pruneware
from tests.tiny import llava_inputs, tiny_llava

_METHODS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
_NOT_ENGINE = ("/pruneware/policies/", "/pruneware/kernels/")


@contextmanager
def engine_syncs():
    """Count host syncs made directly by pruneware's engine code while inside."""
    counter = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def wrap(fn):
        def counted(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "/pruneware/" in caller and not any(part in caller for part in _NOT_ENGINE):
                counter["n"] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _count(model, inputs, plan: str) -> int:
    with pruneware.prune(model, plan, seed=0), torch.no_grad():
        model(**inputs)  # warm-up
        with engine_syncs() as syncs:
            model(**inputs)
    return syncs["n"]


@pytest.mark.parametrize("policy", ["random", "divprune"])
def test_engine_syncs_per_stage_are_at_most_two(policy):
    model = tiny_llava(layers=8)
    inputs = llava_inputs(model, [(4, 1, 5)])
    one = _count(model, inputs, f"{policy}@2:0.5")
    three = _count(model, inputs, f"{policy}@2:0.5,{policy}@4:0.25,{policy}@6:0.125")  # every stage drops tokens
    assert three - one <= 2 * 2  # two more stages
    assert one <= 4 + 2  # per forward: the layout (3) and the report (1); then the stage
