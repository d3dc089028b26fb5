"""The phases of `pruneware.tuning.tuner.tune`, in order: the places each policy can run at,
screening, profiling, the search's shortlist, the presets, verification. They share one
`TuneRun`: the calibration, the cost model, the report and the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pruneware
from pruneware.errors import PlanError
from pruneware.plans.plan import Plan, Stage
from pruneware.plans.presets import ExactPreset, available_presets
from pruneware.tuning import search as S
from pruneware.tuning.budget import BudgetError, CostModel
from pruneware.tuning.calibration import Calibration, Measurement

if TYPE_CHECKING:
    from pruneware.tuning.tuner import TuneReport

Candidates = dict[str, tuple[Plan, str]]  # plan text -> (plan, where it came from)


@dataclass
class TuneRun:
    """One `tune` call's shared state. `total` and `done` count measurements for `on_progress`;
    the deadlines are absolute `time.perf_counter()` values (None: no time budget)."""

    model: Any
    cal: Calibration
    cost: CostModel
    report: TuneReport
    names: list[str]
    n_visual: int | None
    profile_deadline: float | None
    deadline: float | None
    on_progress: Callable[[int, int, str], None] | None
    total: int = 0
    done: int = 0

    def measure(self, plan: Plan, phase: str) -> Measurement:
        m = self.cal.measure(plan)
        self.report.candidates.append({"plan": str(plan), "phase": phase, **m.summary(),
                                       "predicted_cost": round(self.cost.plan_cost(plan), 6)})
        if self.cost.vision is not None and len(plan.all_stages) == 1:  # what this place and policy cost the tower
            stage = plan.all_stages[0]
            ratio = stage.budget / self.n_visual if isinstance(stage.budget, int) and self.n_visual else stage.budget
            if isinstance(ratio, float):
                self.cost.vision.add(stage.where, stage.policy, ratio, m.vision_ratio)
        self.done += 1
        if self.on_progress:
            self.on_progress(self.done, max(self.total, self.done), phase)
        return m

    def out_of_time(self, limit: float | None) -> bool:
        late = limit is not None and time.perf_counter() > limit
        self.report.stopped_early = self.report.stopped_early or late
        return late


def valid_places(model, names: list[str], n_layers: int, max_places: int,
                 vision: list[str] = ()) -> tuple[list, dict[Any, list[str]]]:
    """The places (the `vision` places, `pre` and up to `max_places - 1` layers) where some policy
    runs, and which ones."""
    places = [*vision, *S.places_for(n_layers, max_places)]
    valid = {p: [n for n in names if valid_at(model, n, p)] for p in places}
    places = [p for p in places if valid[p]]
    if not places:
        raise PlanError(f"none of the policies {', '.join(names)} can run on this model at any place")
    return places, valid


def screen(run: TuneRun, places: list, screened: list, valid: dict) -> tuple[dict, S.Profile]:
    """Each place's policy: the best at 1/8 of the tokens where screened, else interpolated."""
    profile = S.Profile()
    choice: dict = {p: valid[p][0] for p in places}
    screen_losses: dict = {}
    for p in screened:
        losses = screen_losses.setdefault(p, {})
        for name in valid[p]:
            if run.out_of_time(run.profile_deadline):
                break
            losses[name] = run.measure(S.to_plan([(p, name, S.SCREEN_RATIO)], run.n_visual), "screen").loss
            profile.add(p, name, S.SCREEN_RATIO, losses[name])
        if losses:
            choice[p] = min(losses, key=losses.__getitem__)
    for p in places:
        if p not in screened and len(valid[p]) > 1:
            choice[p] = S.interpolated_choice(p, screen_losses, valid[p])
    return choice, profile


def profile_places(run: TuneRun, places: list, choice: dict, profile: S.Profile) -> None:
    """Each place's policy alone at every profile ratio, those nearest the budget first."""
    for ratio in S.profile_order(S.PROFILE_RATIOS, S.budget_ratio(run.cost)):
        for p in places:
            if ratio in profile.points.get((p, choice[p]), {}) or run.out_of_time(run.profile_deadline):
                continue
            plan = S.to_plan([(p, choice[p], ratio)], run.n_visual)
            profile.add(p, choice[p], ratio, run.measure(plan, "profile").loss)


def shortlist_schedules(
    run: TuneRun, profile: S.Profile, choice: dict, places: list, max_stages: int, shortlist: int,
) -> Candidates:
    """The search's best `shortlist` distinct schedules, scaled up to spend the whole budget."""
    profiled = [p for p in places if profile.points.get((p, choice[p]))]
    schedules = S.search(profile, choice, profiled, run.cost, max_stages) if profiled else []
    run.report.schedules_searched = len(schedules)
    candidates: Candidates = {}
    shapes: set = set()
    for sched in schedules:
        if len(shapes) >= shortlist:
            break
        shape = tuple((p, pol) for p, pol, _ in sched.stages)
        plan = S.fill(sched.stages, run.cost, run.n_visual) if shape not in shapes else None
        if plan is not None and str(plan) not in candidates:
            shapes.add(shape)
            candidates[str(plan)] = (plan, "search")
    return candidates


def add_presets(run: TuneRun, candidates: Candidates, profile: S.Profile, n_layers: int, rope: str) -> Candidates:
    """The search's best, then every preset solved for the budget (most promising first by the
    profiles), then the search's runners-up."""
    found = list(candidates.items())
    out = dict(found[:1])
    solved = presets_at(run.cost, n_layers, run.n_visual, rope, run.model, set(run.names))
    # most promising first by the profiles (a preset the profiles cannot score goes last)
    for name, plan in sorted(solved.items(), key=lambda kv: (S.surrogate_of(kv[1], profile, run.n_visual), kv[0])):
        key = str(plan)  # a search result may be a preset too: say so
        out[key] = (out[key][0], f"{out[key][1]} = preset {name}") if key in out else (plan, f"preset {name}")
    out.update({k: v for k, v in found[1:] if k not in out})
    return out


def verify(run: TuneRun, candidates: Candidates) -> tuple[Measurement, Plan]:
    """Measure the candidates in order (at least one, then until the deadline); the lowest
    measured objective wins. Fills the report's `chosen`, `best_preset` and costs."""
    if not candidates:
        raise BudgetError(
            f"no plan within {run.cost.budget} was found: the time budget ran out before profiling finished "
            "or the budget is below what the profiled ratios reach; raise --time-budget or the budget"
        )
    report = run.report
    results = []
    limit = run.cost.vision_budget
    for i, (plan, origin) in enumerate(candidates.values()):
        if i > 0 and results and run.out_of_time(run.deadline):
            break
        m = run.measure(plan, "verify")
        report.candidates[-1]["origin"] = origin
        if limit is not None and m.vision_ratio > limit + 1e-9:  # the interpolation let it through: measured over
            report.candidates[-1]["origin"] += f" (over the vision budget: {m.vision_ratio:.4f} > {limit:g})"
            continue
        results.append((m, plan, origin))
    if not results:
        raise BudgetError(f"no plan measured within the vision budget vision_flops_ratio={limit:g}; raise it")
    best_m, best_plan, origin = min(results, key=lambda r: r[0].loss)
    presets_seen = [r for r in results if "preset " in r[2]]
    if presets_seen:
        pm, pp, po = min(presets_seen, key=lambda r: r[0].loss)
        report.best_preset = {"name": po.split("preset ")[-1], "plan": str(pp), **pm.summary()}
    report.chosen = {"origin": origin, **best_m.summary()}
    report.predicted_cost = run.cost.plan_cost(best_plan)
    report.measured_cost = measured_cost(run.cost, best_m, run.cal, best_plan)
    return best_m, best_plan


def valid_at(model, policy: str, place) -> bool:
    """Whether a one-stage plan of `policy` at `place` can run on this model."""
    try:
        pruneware.prune(model, Plan((Stage(policy, place, 0.5),)))
    except PlanError:
        return False
    return True


def presets_at(cost: CostModel, n_layers: int, n_visual: int | None, rope: str, model,
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
            if cost.fits(plan, n_visual):
                best, lo = plan, mid
            else:
                hi = mid
        if best is not None and all(valid_at(model, s.policy, s.where) for s in best.stages):
            try:
                pruneware.prune(model, best)
            except PlanError:
                continue
            out[name] = best
    return out


def measured_cost(cost: CostModel, m: Measurement, cal: Calibration, plan: Plan) -> float:
    """The chosen plan's cost as measured, in the budget's unit."""
    if cost.budget.kind == "avg_tokens":
        return m.avg_visual_tokens
    if cost.budget.kind == "flops_ratio":
        return m.flops_ratio
    return min(cal.prefill_ms(plan) for _ in range(3))
