"""Recycling as a knob of the tuner: each schedule the search shortlists is also verified with
its stages folding the tokens they prune into the tokens they keep (`recycle=MODE`, the plan
option of `pruneware.policies.recycle`), and the measurement decides.

Two variants per mode and schedule, in this order:
  - the in-LLM stages recycle (`divprune@pre:158,divprune[recycle=nearest]@1:79,...`): the
    recipe that led on both tiny models (benchmarks/RESULTS.md, "Recycling and the tuned plan");
  - every stage recycles (`pre` and vision-side stages too), when that is a different plan.
Recycling keeps each stage's count, slots and positions, so a variant costs exactly what its
schedule costs and every budget holds unchanged. A variant a policy refuses (merging policies
have no `recycle`; `sparsevlm` has its own) is skipped. Presets are verified as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pruneware
from pruneware.errors import PlanError
from pruneware.plans.plan import Plan, Stage
from pruneware.policies.recycle import RECYCLE_MODES

TUNABLE_MODES = tuple(m for m in RECYCLE_MODES if m != "none")  # ("nearest", "context")
DEFAULT_MODES = ("nearest",)


def checked_modes(modes: Sequence[str] | str | None) -> tuple[str, ...]:
    """The recycling modes the tuner tries besides none, deduplicated in order; () tries none.

    Accepts a sequence or a ','-separated string ("nearest,context"); "none" alone means ().
    Raises PlanError naming the valid modes for anything else.
    """
    if modes is None:
        return ()
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    out: list[str] = []
    for mode in items:
        if mode in ("", "none"):
            continue
        if mode not in TUNABLE_MODES:
            raise PlanError(f"unknown recycling mode {mode!r} for the tuner; valid: {', '.join(RECYCLE_MODES)}")
        if mode not in out:
            out.append(mode)
    return tuple(out)


def _recycling(stage: Stage, mode: str) -> Stage:
    """`stage` with `recycle=mode` (an explicit `recycle` it already has is kept)."""
    if any(key == "recycle" for key, _ in stage.params):
        return stage
    return replace(stage, params=(*stage.params, ("recycle", mode)))


def variants(plan: Plan, mode: str) -> list[tuple[Plan, str]]:
    """[(plan, what recycles)]: `plan` with its in-LLM stages recycling, then with every stage
    recycling; a variant equal to `plan` or to an earlier variant is left out."""
    stages = plan.all_stages
    in_llm = Plan(tuple(_recycling(s, mode) if isinstance(s.where, int) else s for s in stages))
    everywhere = Plan(tuple(_recycling(s, mode) for s in stages))
    out: list[tuple[Plan, str]] = []
    for candidate, where in ((in_llm, "in-LLM stages"), (everywhere, "every stage")):
        if candidate != plan and all(candidate != seen for seen, _ in out):
            out.append((candidate, where))
    return out


def with_recycling(model, candidates: dict[str, tuple[Plan, str]], modes: Sequence[str]) -> dict[str, tuple[Plan, str]]:
    """The candidates in order, each one the search found followed by its recycling variants
    (origin "<its origin> + recycle=MODE (in-LLM stages|every stage)"); presets unchanged."""
    out: dict[str, tuple[Plan, str]] = {}
    for key, (plan, origin) in candidates.items():
        out[key] = (plan, origin)
        if not origin.startswith("search"):
            continue
        for mode in modes:
            for variant, where in variants(plan, mode):
                text = str(variant)
                if text in out or text in candidates:
                    continue
                try:
                    pruneware.prune(model, variant)  # a policy without `recycle` refuses here
                except PlanError:
                    continue
                out[text] = (variant, f"{origin} + recycle={mode} ({where})")
    return out
