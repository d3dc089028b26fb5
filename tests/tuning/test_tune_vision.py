"""The autotuner with a vision budget: it places `pre-vit` / `vitK` stages, and both the language
model's budget and the vision encoder's FLOPs budget hold (predicted and measured).

The search and cost pieces are checked without a model; one small tune runs on tiny-llava
(2 calibration questions, one policy, one stage), so the file runs in seconds.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

import pruneware
from pruneware.cli import app
from pruneware.errors import PlanError
from pruneware.models import available, load
from pruneware.plans.plan import Plan
from pruneware.tuning import Budget, BudgetError
from pruneware.tuning.budget import cost_model
from pruneware.tuning.calibration import default_calibration
from pruneware.tuning.search import Profile, fill, search, screen_places
from pruneware.tuning.vision import VisionCost, place_layer, vision_places

N_VISUAL = 64


def _vision_cost() -> VisionCost:
    vision = VisionCost()
    for r, v in ((0.5, 0.45), (0.25, 0.3), (0.125, 0.22)):  # a cut tower: a fixed part plus a share per unit
        vision.add("vit1", "random", r, v)
    for r in (0.5, 0.25, 0.125):
        vision.add("pre", "random", r, 1.0)
    return vision


def test_vision_cost_interpolates_between_measured_points_and_refuses_the_unknown():
    vision = _vision_cost()
    assert vision.ratio("vit1", "random", 1.0) == 1.0
    assert vision.ratio("vit1", "random", 0.75) == pytest.approx((1.0 + 0.45) / 2)  # chord to (1, 1)
    assert vision.ratio("vit1", "random", 0.375) == pytest.approx((0.45 + 0.3) / 2)
    assert vision.ratio("vit1", "random", 0.1) == math.inf  # below what was measured
    assert vision.ratio("pre-vit", "random", 0.5) == math.inf  # a vision-side place never measured
    assert vision.ratio(3, "random", 0.5) == 1.0  # in the LLM: the whole tower
    assert vision.summary()["vit1/random"] == {"0.125": 0.22, "0.25": 0.3, "0.5": 0.45}
    assert [place_layer(p) for p in ("pre-vit", "vit2", "pre", 3)] == [0, 0, 0, 3]


def _profiled() -> Profile:
    profile = Profile()
    for r, loss in ((0.5, 0.1), (0.25, 0.3), (0.125, 0.6)):
        profile.add("vit1", "random", r, 2 * loss)  # cutting in the tower hurts more than ...
        profile.add("pre", "random", r, loss)  # ... after it, which is free on the vision side
        profile.add(2, "random", r, loss / 4)
    return profile


def test_search_keeps_every_schedule_within_the_vision_budget():
    places, choice = ["vit1", "pre", 2], {"vit1": "random", "pre": "random", 2: "random"}
    model = cost_model(Budget(avg_tokens=40.0), None, [(N_VISUAL, 10)], 4)
    free = search(_profiled(), choice, places, model, max_stages=2)
    assert free[0].stages[0][0] != "vit1"  # without a vision budget the tower costs nothing: pre wins
    model.vision_budget, model.vision = 0.5, _vision_cost()
    bound = search(_profiled(), choice, places, model, max_stages=2)
    assert bound and all(s.stages[0][0] == "vit1" for s in bound)  # only a cut tower fits 0.5 of it
    assert all(model.vision.ratio("vit1", "random", s.stages[0][2]) <= 0.5 for s in bound)
    assert all(not {"vit1", "pre"} <= {p for p, _, _ in s.stages} for s in bound)  # both feed layer 0
    assert all(s.cost <= 40.0 for s in bound)


def test_fill_spends_the_vision_budget_without_exceeding_it():
    model = cost_model(Budget(avg_tokens=60.0), None, [(N_VISUAL, 10)], 4)  # the LM budget is loose
    model.vision_budget, model.vision = 0.4, _vision_cost()
    plan = fill([("vit1", "random", 0.125)], model, N_VISUAL)
    assert plan is not None and str(plan).startswith("random@vit1:")
    spent = model.vision.ratio("vit1", "random", plan.all_stages[0].budget / N_VISUAL)
    assert 0.4 - 0.01 < spent <= 0.4  # within one token of the vision budget
    assert model.plan_cost(plan) == pytest.approx(plan.all_stages[0].budget)  # the LM sees the cut from layer 0
    assert fill([("pre", "random", 0.125)], model, N_VISUAL) is None  # the whole tower never fits 0.4


def test_screening_covers_every_vision_place():
    assert screen_places(["pre-vit", "vit1", "vit3", "pre", 1, 4, 7]) == ["pre-vit", "vit1", "vit3", "pre", 1, 7]


@pytest.mark.skipif("tiny-llava" not in available(), reason="tiny-llava has no trained weights here")
def test_tune_places_a_vision_stage_and_both_budgets_hold():
    model, processor = load("tiny-llava")
    assert vision_places(model) == ["pre-vit", "vit1", "vit3"]  # a 4-block tower: pre-vit and two cut points
    result = pruneware.tune(model, processor, default_calibration(2, seed=3), {"avg_tokens": 400},
                            policies=["random"], max_stages=1, max_places=2, presets=False, vision_flops_ratio=0.5)
    report, first = result.report, result.plan.all_stages[0]
    assert first.in_vision and Plan.parse(str(result.plan)) == result.plan
    assert report.chosen["vision_ratio"] <= 0.5 and report.vision_budget == 0.5
    assert report.measured_cost <= 400 and report.predicted_cost == pytest.approx(report.measured_cost)
    assert report.vision_costs["pre/random"]["0.125"] == 1.0  # measured: `pre` runs the whole tower
    assert all(v < 1.0 for k, pts in report.vision_costs.items() if k.startswith(("pre-vit", "vit")) for v in pts.values())
    json.dumps(report.summary())


def test_bad_vision_budgets_and_uncuttable_towers_are_refused():
    from tests.tiny import tiny_llava_next

    with pytest.raises(BudgetError, match=r"vision_flops_ratio must be in \(0, 1\]"):
        pruneware.tune(tiny_llava_next(), None, default_calibration(2), {"avg_tokens": 64}, vision_flops_ratio=1.5)
    no_cls = tiny_llava_next()
    no_cls.config.vision_feature_select_strategy = "full"  # no [CLS] outside the visual tokens: no cut
    with pytest.raises(PlanError, match="vision_feature_select_strategy='default'"):
        pruneware.tune(no_cls, None, default_calibration(2), {"avg_tokens": 64}, vision_flops_ratio=0.5)
    result = CliRunner().invoke(app, ["tune", "--avg-tokens", "64", "--vision-flops-ratio", "0"])
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --vision-flops-ratio must be in (0, 1] (vision FLOPs relative to unpruned), got 0")
