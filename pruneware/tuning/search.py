"""Sensitivity profiling and the dynamic program over multi-stage schedules.

A schedule is a sequence of stages at strictly later places (one of `pre` or a vision-side place,
`pre-vit` or `vitK`, when the tuner has a vision budget; then decoder layers) that keep strictly
fewer tokens: ratios r_1 > r_2 > ... of each sample's visual tokens. Its cost
under any budget is separable over layers (see `budget.CostModel`). Its loss is estimated from
single-stage profiles D_{p,l}(r), the measured objective of the one-stage plan "p@l:r":

    surrogate(schedule) = sum_i [ D_{p_i,l_i}(r_i) - D_{p_i,l_i}(r_{i-1}) ],   r_0 = 1, D(1) = 0

Each term is the extra damage of cutting from r_{i-1} to r_i tokens from layer l_i on, read
from the profile of that place and policy. For one stage it is exactly the measured loss; for
several it is the first-order (additive-increment) approximation that HyLRA-style per-layer
profiling relies on. Its errors are caught by measuring the best few schedules for real.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pruneware.plans.plan import Plan, Stage
from pruneware.tuning.budget import CostModel
from pruneware.tuning.vision import place_layer

PROFILE_RATIOS = (0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625)
SCREEN_RATIO = 0.125
Place = str | int  # "pre", "pre-vit", "vitK" or a decoder layer index


@dataclass(frozen=True)
class Schedule:
    """Stages as (place, policy, ratio), in order; `surrogate` is the estimated loss."""

    stages: tuple[tuple[Place, str, float], ...]
    cost: float
    surrogate: float


def places_for(n_layers: int, max_places: int) -> list[Place]:
    """`pre` and up to `max_places - 1` decoder layers in 1..n_layers-1, evenly spread."""
    layers = list(range(1, n_layers))
    k = max_places - 1
    if len(layers) > k:
        layers = sorted({layers[round(i * (len(layers) - 1) / max(k - 1, 1))] for i in range(k)})
    return ["pre", *layers]


def screen_places(places: Sequence[Place], n: int = 2) -> list[Place]:
    """`pre`, every vision-side place, and `n` in-LLM places (the earliest and the latest) where
    every policy is compared."""
    layers = [p for p in places if isinstance(p, int)]
    picks = {layers[round(i * (len(layers) - 1) / max(n - 1, 1))] for i in range(n)} if layers else set()
    return [p for p in places if isinstance(p, str) or p in picks]


def budget_ratio(model: CostModel) -> float:
    """The largest ratio a single `pre` stage may keep within the budget (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if model.constant + model.n_layers * model.layer_cost(mid) <= model.budget.value:
            lo = mid
        else:
            hi = mid
    return max(lo, 1e-6)


def profile_order(ratios: Sequence[float], target: float) -> list[float]:
    """Ratios nearest the budget's (in log2) first: with little time, the most relevant points."""
    return sorted(ratios, key=lambda r: (abs(math.log2(r) - math.log2(target)), -r))


def interpolated_choice(place: Place, screened: dict[Place, dict[str, float]], valid: Sequence[str]) -> str:
    """The policy for an unscreened in-LLM place: the lowest screening loss interpolated linearly
    (in layer index) between the screened in-LLM places on either side of it."""
    layers = sorted(p for p in screened if isinstance(p, int))
    at = place_layer(place)
    below = max((p for p in layers if p <= at), default=None)
    above = min((p for p in layers if p >= at), default=None)
    lo, hi = below if below is not None else above, above if above is not None else below
    if lo is None or hi is None:
        return valid[0]
    w = 0.0 if hi == lo else (at - lo) / (hi - lo)

    def loss(name: str) -> float:
        a, b = screened[lo].get(name, math.inf), screened[hi].get(name, math.inf)
        return (1 - w) * a + w * b

    return min(valid, key=loss)


class Profile:
    """D_{p,l}(r): measured losses per (place, policy) at some ratios, interpolated in log2(r).

    D(1) = 0 (keeping everything changes nothing). The curve is made monotone (fewer tokens never
    estimated to hurt less) by a running maximum from r = 1 down, which removes measurement noise
    that would otherwise reward cutting more.
    """

    def __init__(self) -> None:
        self.points: dict[tuple[Place, str], dict[float, float]] = {}
        self._memo: dict[tuple[Place, str, float], float] = {}

    def add(self, place: Place, policy: str, ratio: float, loss: float) -> None:
        self.points.setdefault((place, policy), {})[ratio] = loss
        self._memo.clear()

    def curve(self, place: Place, policy: str) -> list[tuple[float, float]]:
        pts = sorted({1.0: 0.0, **self.points.get((place, policy), {})}.items(), reverse=True)
        out, worst = [], 0.0
        for r, loss in pts:
            worst = max(worst, loss)
            out.append((r, worst))
        return out

    def loss(self, place: Place, policy: str, ratio: float) -> float:
        key = (place, policy, ratio)
        if key not in self._memo:
            self._memo[key] = self._interpolate(self.curve(place, policy), ratio)
        return self._memo[key]

    @staticmethod
    def _interpolate(pts: list[tuple[float, float]], ratio: float) -> float:
        if ratio >= 1.0:
            return 0.0
        for (r0, d0), (r1, d1) in itertools.pairwise(pts):
            if r1 <= ratio <= r0:
                t = (math.log2(r0) - math.log2(ratio)) / (math.log2(r0) - math.log2(r1))
                return d0 + t * (d1 - d0)
        return math.inf  # below the smallest ratio profiled: not allowed

    def lowest(self, place: Place, policy: str) -> float:
        return min(self.points.get((place, policy), {1.0: 0}))


def dp_levels(lowest: float, per_octave: int = 2) -> list[float]:
    """Keep ratios 2^(-i/per_octave) from just below 1 down to `lowest`."""
    out, i = [], 1
    while (r := 2 ** (-i / per_octave)) >= lowest * (1 - 1e-9):
        out.append(r)
        i += 1
    return out


def search(profile: Profile, choice: dict[Place, str], places: Sequence[Place], model: CostModel,
           max_stages: int, per_octave: int = 2) -> list[Schedule]:
    """Every schedule of up to `max_stages` stages over `places` and the ratio grid, within the
    budget, best surrogate first. Exhaustive over the grid (places x levels is small), which is
    the dynamic program's answer without its bookkeeping: costs and surrogates are additive.
    With a vision budget, a schedule's first stage must also keep within it (`CostModel.vision_fits`);
    `pre` and the vision-side places all feed layer 0, so a schedule holds at most one of them."""
    order = {p: i for i, p in enumerate(places)}
    levels = dp_levels(min(profile.lowest(p, choice[p]) for p in places), per_octave)
    layer = {p: place_layer(p) for p in places}
    level_cost = [model.layer_cost(r) for r in levels]
    full_cost = model.layer_cost(1.0)
    budget = model.budget.value
    out: list[Schedule] = []
    for k in range(1, max_stages + 1):
        for where in itertools.combinations(places, k):
            if len({layer[p] for p in where}) < k:  # `pre`, vision-side places and layer 0 share layer 0
                continue
            bounds = [layer[p] for p in where] + [model.n_layers]
            for idx in itertools.combinations(range(len(levels)), k):
                cost = model.constant + layer[where[0]] * full_cost
                cost += sum((bounds[i + 1] - bounds[i]) * level_cost[j] for i, j in enumerate(idx))
                if cost > budget or not model.vision_fits(where[0], choice[where[0]], levels[idx[0]]):
                    continue
                loss, previous = 0.0, 1.0
                for p, j in zip(where, idx, strict=True):
                    pol = choice[p]
                    loss += profile.loss(p, pol, levels[j]) - profile.loss(p, pol, previous)
                    previous = levels[j]
                if math.isfinite(loss):
                    stages = tuple((p, choice[p], levels[j]) for p, j in zip(where, idx, strict=True))
                    out.append(Schedule(stages, cost, loss))
    out.sort(key=lambda s: (s.surrogate, s.cost, order[s.stages[0][0]]))
    return out


def surrogate_of(plan: Plan, profile: Profile, n_visual: int | None) -> float:
    """The surrogate loss of any plan from the profiles (inf where a stage was not profiled)."""
    loss, previous = 0.0, 1.0
    for stage in plan.stages:
        if stage.relative or not n_visual:
            return math.inf
        ratio = stage.budget / n_visual if isinstance(stage.budget, int) else stage.budget
        if (stage.where, stage.policy) not in profile.points:
            return math.inf
        loss += profile.loss(stage.where, stage.policy, ratio) - profile.loss(stage.where, stage.policy, previous)
        previous = ratio
    return loss


def to_plan(stages: Sequence[tuple[Place, str, float]], n_visual: int | None, positions: str = "keep") -> Plan:
    """A Plan from (place, policy, ratio) stages: counts when every sample has `n_visual`
    tokens (exact, readable), otherwise ratios rounded to 4 digits."""
    out = []
    for place, policy, ratio in stages:
        budget: float | int = max(1, round(ratio * n_visual)) if n_visual else max(round(ratio, 4), 1e-4)
        out.append(Stage(policy, place, budget, positions))  # type: ignore[arg-type]
    return Plan(tuple(out))


def fill(stages: Sequence[tuple[Place, str, float]], model: CostModel, n_visual: int | None,
         positions: str = "keep") -> Plan | None:
    """Scale every stage's ratio up by one common factor s >= 1 (bisection) while the plan stays
    within budget (and the vision budget, if any), so no budget is left unspent; stages that
    reach 1.0 keep everything and go."""

    def build(s: float) -> Plan | None:
        kept = [(p, pol, r * s) for p, pol, r in stages
                if r * s < 1.0 and (not n_visual or round(r * s * n_visual) < n_visual)]
        return to_plan(kept, n_visual, positions) if kept else None

    lo, hi = 1.0, 1.0 / min(r for _, _, r in stages)
    best = build(lo)
    if best is None or not model.fits(best, n_visual):  # rounding pushed it over: shrink
        best, lo, hi = None, 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        plan = build(mid)
        if plan is not None and model.fits(plan, n_visual):
            lo, best = mid, plan
        else:
            hi = mid
    return best  # None: no scale of these stages fits the budget
