"""`pruneware.tuning`: the plan that loses least for a model under a budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pruneware
from pruneware.errors import PlanError
from pruneware.plans.plan import Plan, Stage
from pruneware.plans.presets import ExactPreset, available_presets
from pruneware.policies import available as available_policies
from pruneware.policies import get_policy
from pruneware.tuning import search as S
from pruneware.tuning.budget import Budget, BudgetError, CostModel, cost_model
from pruneware.tuning.calibration import Calibration, Measurement, check_not_reporting, default_calibration

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
    time_budget_s: float | None = None, presets: bool = True,
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
        on_progress: called as on_progress(done, total, what) after each measurement.
    Raises:
        BudgetError (a PlanError): a malformed or unreachable budget; CalibrationError: empty
        calibration or the reporting split; PlanError: an unknown policy.
    """
    start = time.perf_counter()
    deadline = None if time_budget_s is None else start + time_budget_s
    # Profiling stops at 70% of the time budget, so the measured verification always happens.
    profile_deadline = None if time_budget_s is None else start + PROFILE_SHARE * time_budget_s
    if budget is None:
        raise BudgetError("tune needs a budget: avg_tokens=N, flops_ratio=r or latency_ms=t")
    budget = Budget.of(budget)
    if not 1 <= max_stages <= 4:
        raise PlanError(f"max_stages must be in 1..4, got {max_stages}")
    if max_places < 2:
        raise PlanError(f"max_places must be >= 2 ('pre' and one layer), got {max_places}")
    names = sorted(n for n, c in available_policies().items() if not c.recycles) if policies is None \
        else list(policies)
    for name in names:
        get_policy(name)  # raises with the valid names
    items = default_calibration(64 if calibration is None else calibration, seed) \
        if calibration is None or isinstance(calibration, int) else list(calibration)
    check_not_reporting(items)
    cal = Calibration(model, processor, items, bench=bench, batch_size=batch_size, seed=seed,
                      accuracy_weight=accuracy_weight)
    n_layers, n_visual = cal.adapter.n_layers, cal.n_visual
    rope = cal.adapter.rope
    widest = max(n for n, _ in cal.samples)

    def timer(k: int) -> float:
        return cal.prefill_ms(Plan((Stage("random", "pre", min(1.0, k / widest)),)))

    cost = cost_model(budget, cal.adapter.text_config, cal.samples, n_layers, timer, widest)
    cost.check_reachable()
    report = TuneReport(str(budget), OBJECTIVE, n_calibration=len(items), reference_accuracy=cal.reference_accuracy,
                        unpruned_cost=cost.unpruned_cost(), cost_model=cost.fit)

    places = S.places_for(n_layers, max_places)
    valid = {p: [n for n in names if _valid(model, n, p)] for p in places}
    places = [p for p in places if valid[p]]
    if not places:
        raise PlanError(f"none of the policies {', '.join(names)} can run on this model at any place")
    screened = [p for p in S.screen_places(places) if len(valid[p]) > 1]
    total = sum(len(valid[p]) for p in screened) + len(places) * len(S.PROFILE_RATIOS) + shortlist + 6
    done = 0

    def measure(plan: Plan, phase: str) -> Measurement:
        nonlocal done
        m = cal.measure(plan)
        report.candidates.append({"plan": str(plan), "phase": phase, **m.summary(),
                                  "predicted_cost": round(cost.plan_cost(plan), 6)})
        done += 1
        if on_progress:
            on_progress(done, max(total, done), phase)
        return m

    def out_of_time(limit: float | None = profile_deadline) -> bool:
        late = limit is not None and time.perf_counter() > limit
        report.stopped_early = report.stopped_early or late
        return late

    profile = S.Profile()
    choice: dict = {p: valid[p][0] for p in places}
    screen_losses: dict = {}
    for p in screened:
        losses = screen_losses.setdefault(p, {})
        for name in valid[p]:
            if out_of_time():
                break
            losses[name] = measure(S.to_plan([(p, name, S.SCREEN_RATIO)], n_visual), "screen").loss
            profile.add(p, name, S.SCREEN_RATIO, losses[name])
        if losses:
            choice[p] = min(losses, key=losses.__getitem__)
    for p in places:
        if p not in screened and len(valid[p]) > 1:
            choice[p] = S.interpolated_choice(p, screen_losses, valid[p])
    for ratio in S.profile_order(S.PROFILE_RATIOS, S.budget_ratio(cost)):
        for p in places:
            if ratio in profile.points.get((p, choice[p]), {}) or out_of_time():
                continue
            profile.add(p, choice[p], ratio, measure(S.to_plan([(p, choice[p], ratio)], n_visual), "profile").loss)

    profiled = [p for p in places if profile.points.get((p, choice[p]))]
    schedules = S.search(profile, choice, profiled, cost, max_stages) if profiled else []
    report.schedules_searched = len(schedules)
    candidates: dict[str, tuple[Plan, str]] = {}
    shapes: set = set()
    for sched in schedules:
        if len(shapes) >= shortlist:
            break
        shape = tuple((p, pol) for p, pol, _ in sched.stages)
        plan = S.fill(sched.stages, cost, n_visual) if shape not in shapes else None
        if plan is not None and str(plan) not in candidates:
            shapes.add(shape)
            candidates[str(plan)] = (plan, "search")
    if presets:  # verified right after the search's best, before its runners-up
        found = list(candidates.items())
        candidates = dict(found[:1])
        solved = _presets_at(cost, n_layers, n_visual, rope, model, set(names))
        # most promising first by the profiles (a preset the profiles cannot score goes last)
        for name, plan in sorted(solved.items(), key=lambda kv: (S.surrogate_of(kv[1], profile, n_visual), kv[0])):
            key = str(plan)  # a search result may be a preset too: say so
            candidates[key] = (candidates[key][0], f"{candidates[key][1]} = preset {name}") if key in candidates \
                else (plan, f"preset {name}")
        candidates.update({k: v for k, v in found[1:] if k not in candidates})
    if not candidates:
        raise BudgetError(
            f"no plan within {budget} was found: the time budget ran out before profiling finished "
            "or the budget is below what the profiled ratios reach; raise --time-budget or the budget"
        )
    results = []
    for i, (plan, origin) in enumerate(candidates.values()):
        if i > 0 and out_of_time(deadline):
            break
        results.append((measure(plan, "verify"), plan, origin))
        report.candidates[-1]["origin"] = origin
    best_m, best_plan, origin = min(results, key=lambda r: r[0].loss)
    presets_seen = [r for r in results if "preset " in r[2]]
    if presets_seen:
        pm, pp, po = min(presets_seen, key=lambda r: r[0].loss)
        report.best_preset = {"name": po.split("preset ")[-1], "plan": str(pp), **pm.summary()}
    report.chosen = {"origin": origin, **best_m.summary()}
    report.predicted_cost = cost.plan_cost(best_plan)
    report.measured_cost = _measured(cost, best_m, cal, best_plan)
    report.time_s = round(time.perf_counter() - start, 2)
    return TuneResult(best_plan, report)


def _valid(model, policy: str, place) -> bool:
    """Whether a one-stage plan of `policy` at `place` can run on this model."""
    try:
        pruneware.prune(model, Plan((Stage(policy, place, 0.5),)))
    except PlanError:
        return False
    return True


def _presets_at(cost: CostModel, n_layers: int, n_visual: int | None, rope: str, model,
                policies: set[str]) -> dict[str, Plan]:
    """Each scaled preset of `policies` solved (bisection on avg_tokens) for the highest cost within budget."""
    if n_visual is None:
        return {}
    out = {}
    for name, preset in sorted(available_presets().items()):
        if isinstance(preset, ExactPreset) or not {t.policy for t in preset.variant(rope).stages} <= policies:
            continue
        best, lo, hi = None, 0.0, float(n_visual)
        for _ in range(30):
            mid = (lo + hi) / 2
            try:
                plan = preset.build(n_layers, mid, n_visual, rope)
            except PlanError:
                lo = mid
                continue
            if cost.plan_cost(plan) <= cost.budget.value:
                best, lo = plan, mid
            else:
                hi = mid
        if best is not None and all(_valid(model, s.policy, s.where) for s in best.stages):
            try:
                pruneware.prune(model, best)
            except PlanError:
                continue
            out[name] = best
    return out


def _measured(cost: CostModel, m: Measurement, cal: Calibration, plan: Plan) -> float:
    if cost.budget.kind == "avg_tokens":
        return m.avg_visual_tokens
    if cost.budget.kind == "flops_ratio":
        return m.flops_ratio
    return min(cal.prefill_ms(plan) for _ in range(3))
