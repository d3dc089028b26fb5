"""`pruneware.tuning`: the plan that loses least for a model under a budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pruneware.errors import PlanError
from pruneware.plans.plan import Plan, Stage
from pruneware.policies import available as available_policies
from pruneware.policies import get_policy
from pruneware.tuning import search as S
from pruneware.tuning.budget import Budget, BudgetError, cost_model
from pruneware.tuning.calibration import Calibration, check_not_reporting, default_calibration
from pruneware.tuning.phases import (
    TuneRun, add_presets, profile_places, screen, shortlist_schedules, valid_places, verify,
)
from pruneware.tuning.recycling import DEFAULT_MODES, checked_modes, with_recycling
from pruneware.tuning.spatial import checked_weights, with_spatial
from pruneware.tuning.vision import VisionCost, vision_places

PROFILE_SHARE = 0.7
OBJECTIVE = ("mean over calibration questions of KL(unpruned || pruned) of the first answer token "
             "+ accuracy_weight * (1 - score of that token), where labels exist")


@dataclass
class TuneReport:
    """What the search did. `candidates`: every plan measured, with its phase (screen, profile,
    verify), objective and predicted cost; costs are in the budget's unit. `best_preset` is the
    best of the presets verified before the time budget ran out."""

    budget: str
    objective: str
    candidates: list[dict] = field(default_factory=list)
    predicted_cost: float = 0.0
    measured_cost: float = 0.0
    unpruned_cost: float = 0.0
    time_s: float = 0.0
    n_calibration: int = 0
    reference_accuracy: float | None = None
    chosen: dict = field(default_factory=dict)
    best_preset: dict | None = None
    schedules_searched: int = 0
    cost_model: dict = field(default_factory=dict)
    stopped_early: bool = False
    vision_budget: float | None = None
    vision_costs: dict = field(default_factory=dict)  # measured {"place/policy": {ratio: vision ratio}}

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly digest (every field)."""
        return dict(self.__dict__)


@dataclass
class TuneResult:
    plan: Plan
    report: TuneReport

    def __str__(self) -> str:
        return str(self.plan)


def tune(
    model, processor, calibration: Sequence[Any] | int | None = None, budget: Budget | Mapping | str | None = None,
    *, bench: str = "synthetic", seed: int = 0, policies: Sequence[str] | None = None, max_stages: int = 3,
    max_places: int = 6, shortlist: int = 4, accuracy_weight: float = 1.0, batch_size: int = 32,
    time_budget_s: float | None = None, presets: bool = True, vision_flops_ratio: float | None = None,
    recycle: Sequence[str] | str | None = DEFAULT_MODES, spatial: Sequence[float] | str | None = (),
    on_progress: Callable[[int, int, str], None] | None = None,
) -> TuneResult:
    """Find the plan with the lowest calibration objective whose cost stays within `budget`.

    What it optimises: the mean, over calibration questions, of KL(p_unpruned || p_pruned) of
    the first answer token, plus `accuracy_weight` times the error of that token where labels
    exist (`pruneware.tuning.calibration`). Subject to: the plan's cost <= budget, where cost is
    the average visual tokens per layer, the LM FLOPs ratio, or a latency fitted on this machine.

    How (HyLRA-style profiling + a dynamic program, then verification):
      1. The unpruned reference on the calibration set is computed once and cached.
      2. Screening: at `pre` and the first and last in-LLM places, every valid policy prunes to
         1/8 of the tokens; the best policy per place is kept (a place in between takes the
         policy whose screening loss, interpolated between its neighbours, is lowest). Places
         are `pre` and up to `max_places - 1` layers, evenly spread.
      3. Profiling: each place's policy is measured alone at ratios 1/2 ... 1/64, those nearest
         the budget first (so a time budget cuts the least relevant): the loss curve D_l(r).
      4. Search: every schedule of up to `max_stages` stages over the places and a ratio grid
         within budget is scored by the additive surrogate sum_i D_{l_i}(r_i) - D_{l_i}(r_{i-1})
         (`pruneware.tuning.search`). Costs are separable over layers, so this is exact on cost.
      5. Verification: the best `shortlist` distinct schedules, scaled up to spend the whole
         budget, and (with `presets`) every preset solved for the same budget, are measured for
         real (the search's best first, then the presets); the lowest measured objective wins.
         With `recycle`, each search schedule is also measured with its in-LLM stages, then all
         its stages, recycling their pruned tokens (`pruneware.tuning.recycling`); with
         `spatial`, each of those with DivPrune's grid term at `pre` (`pruneware.tuning.spatial`).
    With `vision_flops_ratio=v` (LLaVA-1.5 and the Qwen-VL families), the plan must also keep the
    vision encoder's FLOPs at or below v of the unpruned model's, and the places searched include
    the vision-side ones (`pre-vit` and up to two `vitK` cut points, `pruneware.tuning.vision`),
    screened and profiled like the others; a plan's vision cost is its first stage's, interpolated
    from what the profiling runs measured (an over-estimate between measured points), and the
    chosen plan's measured vision cost is checked against v. Without it the tower is not a cost
    and the vision-side places are not searched (they cost the language model what `pre` does).
    Why it is sound: the budget holds exactly (avg_tokens, flops_ratio) or under the fitted
    model (latency_ms), because every candidate's cost is computed from its plan; the answer is
    chosen by measurement, never by the surrogate alone, so a surrogate error can only cost
    optimality, not correctness; with `presets`, the result is at least as good on the
    calibration set as every preset at the same budget.

    Args:
        calibration: questions (items with image, question, answer(s), id), a count of synthetic
            train-split questions, or None for 64 of them. Never the synthetic eval split.
        budget: Budget(avg_tokens=64), {"flops_ratio": 0.3}, or "latency_ms=40".
        policies: restrict the search to these registered policies (default: all but those that
            add recycled tokens, `sparsevlm`, whose cost the budget's plan arithmetic does not see).
        time_budget_s: profiling stops at 70% of this and verification at 100% (at least one
            plan is always measured); what was profiled is still searched.
        recycle: recycling modes ("nearest", "context") verified on each searched schedule besides
            the plain one; () or "none" switches the knob off. Same cost, so budgets hold.
        spatial: weights w of `divprune[spatial=w]` verified on each searched schedule whose first
            stage is DivPrune at `pre` (default (): off). Same cost, so budgets hold.
        on_progress: called as on_progress(done, total, what) after each measurement.
    Raises:
        BudgetError (a PlanError): a malformed or unreachable budget; CalibrationError: empty
        calibration or the reporting split; PlanError: an unknown policy.
    """
    start = time.perf_counter()
    budget, names = _checked_arguments(budget, max_stages, max_places, policies)
    modes = checked_modes(recycle)
    weights = checked_weights(spatial)
    if vision_flops_ratio is not None:
        if isinstance(vision_flops_ratio, bool) or not isinstance(vision_flops_ratio, int | float) \
                or not 0.0 < vision_flops_ratio <= 1.0:
            raise BudgetError(f"vision_flops_ratio must be in (0, 1] (vision FLOPs relative to unpruned), "
                              f"got {vision_flops_ratio!r}")
        vision_places(model)  # a family whose tower cannot be cut fails before any work
    items = default_calibration(64 if calibration is None else calibration, seed) \
        if calibration is None or isinstance(calibration, int) else list(calibration)
    check_not_reporting(items)
    cal = Calibration(model, processor, items, bench=bench, batch_size=batch_size, seed=seed,
                      accuracy_weight=accuracy_weight)
    n_layers, n_visual, rope = cal.adapter.n_layers, cal.n_visual, cal.adapter.rope
    widest = max(n for n, _ in cal.samples)

    def timer(k: int) -> float:
        return cal.prefill_ms(Plan((Stage("random", "pre", min(1.0, k / widest)),)))

    cost = cost_model(budget, cal.adapter.text_config, cal.samples, n_layers, timer, widest)
    cost.check_reachable()
    if vision_flops_ratio is not None:
        cost.vision_budget, cost.vision = vision_flops_ratio, VisionCost()
    report = TuneReport(str(budget), OBJECTIVE, n_calibration=len(items), reference_accuracy=cal.reference_accuracy,
                        unpruned_cost=cost.unpruned_cost(), cost_model=cost.fit, vision_budget=vision_flops_ratio)
    # Profiling stops at 70% of the time budget, so the measured verification always happens.
    run = TuneRun(
        model, cal, cost, report, names, n_visual,
        profile_deadline=None if time_budget_s is None else start + PROFILE_SHARE * time_budget_s,
        deadline=None if time_budget_s is None else start + time_budget_s, on_progress=on_progress,
    )

    places, valid = valid_places(model, names, n_layers, max_places,
                                 vision_places(model) if vision_flops_ratio is not None else [])
    screened = [p for p in S.screen_places(places) if len(valid[p]) > 1]
    run.total = sum(len(valid[p]) for p in screened) + len(places) * len(S.PROFILE_RATIOS) \
        + shortlist * (1 + 2 * len(modes)) * (1 + len(weights)) + 6
    choice, profile = screen(run, places, screened, valid)
    profile_places(run, places, choice, profile)
    candidates = shortlist_schedules(run, profile, choice, places, max_stages, shortlist)
    if presets:  # verified right after the search's best, before its runners-up
        candidates = add_presets(run, candidates, profile, n_layers, rope)
    candidates = with_recycling(model, candidates, modes)
    candidates = with_spatial(candidates, weights)
    _, best_plan = verify(run, candidates)
    report.vision_costs = cost.vision.summary() if cost.vision is not None else {}
    report.time_s = round(time.perf_counter() - start, 2)
    return TuneResult(best_plan, report)


def _checked_arguments(
    budget: Budget | Mapping | str | None, max_stages: int, max_places: int, policies: Sequence[str] | None,
) -> tuple[Budget, list[str]]:
    """The budget and the policies to search, or the error that names what is wrong."""
    if budget is None:
        raise BudgetError("tune needs a budget: avg_tokens=N, flops_ratio=r or latency_ms=t")
    budget = Budget.of(budget)
    if not 1 <= max_stages <= 4:
        raise PlanError(f"max_stages must be in 1..4, got {max_stages}")
    if max_places < 2:
        raise PlanError(f"max_places must be >= 2 ('pre' and one layer), got {max_places}")
    names = sorted(n for n, c in available_policies().items() if not c.needs.recycles) if policies is None \
        else list(policies)
    for name in names:
        get_policy(name)  # raises with the valid names
    return budget, names
