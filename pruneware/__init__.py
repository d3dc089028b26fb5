"""pruneware: visual-token pruning for vision-language models.

    import pruneware
    with pruneware.prune(model, "divprune@pre:0.5,random@20:0.2", seed=0) as run:
        out = model.generate(**inputs)
    run.report

Importing pruneware patches nothing: hooks exist only inside a session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pruneware.engine.session import Session, attached_session
from pruneware.errors import ArgumentError, NonFiniteError
from pruneware.plans import Plan, PlanError, Stage, available_presets
from pruneware.report import Report

__version__ = "0.1.0"
__all__ = [
    "ArgumentError", "NonFiniteError", "Plan", "PlanError", "Report", "Session", "Stage", "attach",
    "available_presets", "detach", "load", "prune", "tune",
]


def prune(
    model: nn.Module, plan: str | Plan, *, seed: int = 0, avg_tokens: float | None = None,
    on_report: Callable[[Report], Any] | None = None, small_images: str = "error",
) -> Session:
    """A session to use as a context manager: `with pruneware.prune(model, "fastv") as run: ...`.

    Args:
        model: a supported *ForConditionalGeneration model (see `pruneware.adapters`).
        plan: a plan string ("random@20:0.25"), a Plan, or a preset name ("fastv").
        seed: seeds random policies; the same inputs give the same kept tokens.
        avg_tokens: solve each sample's stage budgets so its average visual tokens per decoder
            layer is this (a scaled preset such as "adaptinfer", or a plan string without
            budgets; a paper's exact schedule such as "adaptinfer-llava-64" takes none).
        on_report: called with each call's Report when its prefill completes (on that thread);
            `session.report` is the last call completed on the current thread.
        small_images: under avg_tokens, what a sample with fewer visual tokens than avg_tokens
            gets: "error" (default: a PlanError naming the sample, and the call runs nothing) or
            "keep" (that sample keeps all its visual tokens; `Report.below_budget` lists it),
            e.g. for a server whose requests mix image sizes. No effect without avg_tokens.
    Raises:
        PlanError: a malformed or out-of-range plan, an unknown policy or preset, or a plan
            (or exact-schedule preset) that sets budgets together with avg_tokens.
        ArgumentError: (a TypeError and ValueError) seed not an integer in [-2**63, 2**64 - 1],
            avg_tokens not a positive finite number or None, on_report not callable or None,
            small_images not "error" or "keep".
        TypeError: an unsupported model.
    """
    return Session(model, plan, seed=seed, avg_tokens=avg_tokens, on_report=on_report, small_images=small_images)


def attach(
    model: nn.Module, plan: str | Plan, *, seed: int = 0, avg_tokens: float | None = None,
    on_report: Callable[[Report], Any] | None = None, small_images: str = "error",
) -> Session:
    """Install pruning on a long-lived model until `detach(model)`.

    One attached model serves concurrent calls from several threads; `on_report(report)`
    receives each call's report (see `prune` for the arguments and the errors).
    """
    return Session(
        model, plan, seed=seed, avg_tokens=avg_tokens, on_report=on_report, small_images=small_images,
    ).attach()


def detach(model: nn.Module) -> None:
    """Remove the session attached to `model` and restore it exactly."""
    session = attached_session(model)
    if session is None:
        raise RuntimeError("no pruneware session is attached to this model")
    session.detach()


def load(name: str):
    """Load an embedded tiny model: `(model, processor)`. See `pruneware.models`."""
    from pruneware.models import load as _load

    return _load(name)


def tune(model: nn.Module, processor, calibration=None, budget=None, **kwargs: Any):
    """The plan that loses least on `calibration` within `budget`: a `TuneResult` with `.plan`
    and `.report`. See `pruneware.tuning.tuner.tune` for the arguments and the method."""
    from pruneware.tuning import tune as _tune

    return _tune(model, processor, calibration, budget, **kwargs)
