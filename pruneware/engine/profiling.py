"""Counting what a pruned forward costs on the host: top-level torch ops and host syncs.

For `benchmarks/launch_budget.py` and the launch-budget test; counts, never times, so they are
deterministic on any machine. Not part of the public API, and never active unless a caller
opens one of these contexts (importing this module patches nothing).

What the user pays per pruned forward, against the same forward unpruned (`plan_cost`):
  - ops: top-level `aten::` ops the torch profiler sees (an aten op not inside another aten
    op), every one, whoever issues it: the model, the engine, the policy's scoring and merging.
    On a GPU each is about one kernel launch, and at batch 1 prefill is bound by launches.
    A Triton kernel is one launch but no aten op, so a CUDA run would under-count it; on the
    CPU the plain-torch reference runs instead, and its ops are what is counted;
  - syncs: calls that bring a tensor's value to the host (`SYNC_METHODS`: `.item()`,
    `.tolist()`, `.cpu()`, `int()`, `float()`, `bool()`, `__index__`); each waits for the GPU.
The budget (`OPS_PER_STAGE`, `SYNCS_PER_STAGE`) holds per stage: a plan's extra ops and syncs
divided by its stage count.

Who makes a call (for diagnosis: `count_host_syncs`, `TorchCallCounter`) is read from the
innermost Python frame outside torch:
  - "policy": a policy's own scoring: `pruneware/policies/`, the kernels a policy calls, and
    `attention_policy_scores`, which feeds the score kernel the captured rows;
  - "engine": any other pruneware code (session, levels, masks, the stage runner, the gather kernel...);
  - "model": everything else (transformers' own code, the caller).
"""

from __future__ import annotations

import collections
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import pruneware
from pruneware.policies import available

OPS_PER_STAGE = 40  # extra top-level aten ops per stage, scoring and merging included
SYNCS_PER_STAGE = 2  # extra host syncs per stage

# Tensor methods that bring a value to the host: each waits for the device on a GPU.
SYNC_METHODS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
# Torch calls that read metadata only: no op, no launch.
METADATA_CALLS = ("__get__", "shape", "dtype", "device", "is_cuda", "numel", "dim", "size", "__len__", "ndim",
                  "is_floating_point")
PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # pruneware's own files, wherever it is installed
POLICY_DIRS = tuple(
    os.path.join(PACKAGE_DIR, *part.split("/")) + os.sep
    for part in ("policies", "kernels/scores", "kernels/divprune", "kernels/dart", "kernels/preview",
                 "kernels/text_prior", "kernels/sparsevlm", "kernels/visionzip", "kernels/cdpruner", "kernels/loco")
)
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

    For diagnosis: who issues the calls (an upper bound on the ops, views included). Use as a
    context manager; `counts` is a Counter keyed by owner.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        if getattr(func, "__name__", "") not in METADATA_CALLS:
            self.counts[owner(traceback.extract_stack(limit=16)[:-1])] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class ForwardCost:
    """One call's top-level aten ops (`names`: how many of each) and host syncs."""

    ops: int
    syncs: int
    names: collections.Counter

    def minus(self, other: ForwardCost) -> ForwardCost:
        names = collections.Counter(self.names)
        names.subtract(other.names)
        nonzero = collections.Counter({name: n for name, n in names.items() if n})
        return ForwardCost(self.ops - other.ops, self.syncs - other.syncs, nonzero)


def forward_cost(call: Callable[[], Any]) -> ForwardCost:
    """Top-level `aten::` ops (the torch profiler's, on the CPU) and host syncs of `call()`."""
    with torch.no_grad(), count_host_syncs() as syncs, profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    names: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            names[event.name] += 1
    return ForwardCost(sum(names.values()), syncs["total"], names)


def plan_cost(model: torch.nn.Module, inputs: dict, plan: str | None, seed: int = 0) -> ForwardCost:
    """The cost of one `model(**inputs)` inside `pruneware.prune(model, plan)` (None: unpruned),
    after one warm-up forward (transformers and the session memoise on the first)."""
    with torch.no_grad():
        model(**inputs)
    if plan is None:
        return forward_cost(lambda: model(**inputs))
    with pruneware.prune(model, plan, seed=seed):
        with torch.no_grad():
            model(**inputs)
        return forward_cost(lambda: model(**inputs))


def budget_plans(layers: int = 8) -> list[str]:
    """A plan for every registered policy at every place it may run, with its defaults: in the
    vision tower (`pre-vit` and before block 1), `pre` (one stage), and in the language model
    one stage and three (layers 2, 4, 6 of `layers`). A model may refuse some (PlanError)."""
    plans = []
    for name, cls in sorted(available().items()):
        if cls.needs.vit:
            plans += [f"{name}@pre-vit:0.5", f"{name}@vit1:0.5"]
        if cls.needs.pre:
            plans.append(f"{name}@pre:0.25")
        if cls.needs.llm:
            a, b, c = (max(1, layers * i // 8) for i in (2, 4, 6))
            plans.append(f"{name}@{a}:0.5")
            plans.append(f"{name}@{a}:0.5,{name}@{b}:0.25,{name}@{c}:0.125")
    return plans


def stage_count(plan: str) -> int:
    """The stages of a plan, vision-side ones (`pre-vit`, `vitK`) included."""
    parsed = pruneware.Plan.parse(plan)
    return len(parsed.stages) + len(parsed.vision)


def within_budget(extra: ForwardCost, stages: int) -> bool:
    """Whether a plan of `stages` stages adding `extra` keeps to the per-stage budget."""
    return extra.ops <= OPS_PER_STAGE * stages and extra.syncs <= SYNCS_PER_STAGE * stages
