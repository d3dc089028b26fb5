"""The plan autotuner: budgets hold, plans round-trip, the reporting split is refused, the search
is exact on its own surrogate, and the CLI's JSON plugs into `pruneware eval`.

Small on purpose: 2-4 calibration questions and a restricted search, so the file runs in seconds.
No timing is asserted (the latency cost model is tested with a fake timer).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import pruneware
from pruneware.cli import app
from pruneware.models import available, load
from pruneware.plans.plan import Plan
from pruneware.tuning import Budget, BudgetError, CalibrationError
from pruneware.tuning.budget import CostModel, cost_model
from pruneware.tuning.calibration import default_calibration
from pruneware.tuning.search import Profile, fill, search

pytestmark = pytest.mark.skipif("tiny-llava" not in available(), reason="tiny-llava has no trained weights here")
N_VISUAL, N_LAYERS = 576, 8
SMALL = dict(policies=["random", "divprune"], max_stages=2, max_places=3, shortlist=2)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-llava")


@pytest.fixture(scope="module")
def tuned(tiny):
    model, processor = tiny
    return pruneware.tune(model, processor, default_calibration(4, seed=1), {"avg_tokens": 64}, **SMALL)


def test_tuned_plan_respects_the_budget_and_round_trips(tuned):
    plan, report = tuned.plan, tuned.report
    assert Plan.parse(str(plan)) == plan and str(Plan.parse(str(plan))) == str(plan)
    assert plan.avg_visual_tokens(N_VISUAL, N_LAYERS) <= 64
    assert report.predicted_cost == pytest.approx(report.measured_cost) and report.measured_cost <= 64
    assert report.budget == "avg_tokens=64" and "KL" in report.objective
    assert {c["phase"] for c in report.candidates} == {"screen", "profile", "verify"}
    verified = [c for c in report.candidates if c["phase"] == "verify"]
    assert all(c["predicted_cost"] <= 64 for c in verified)
    assert report.chosen["loss"] == min(c["loss"] for c in verified)  # chosen by measurement
    assert report.best_preset is None or report.chosen["loss"] <= report.best_preset["loss"]
    assert {s.policy for s in plan.stages} <= {"random", "divprune"} and len(plan.stages) <= 2
    assert report.n_calibration == 4 and report.time_s > 0
    json.dumps(report.summary())


def test_flops_budget_is_exact(tiny):
    model, processor = tiny
    result = pruneware.tune(model, processor, default_calibration(4, seed=2), Budget(flops_ratio=0.3),
                            policies=["random"], max_stages=1, max_places=2, presets=False)
    assert result.report.predicted_cost <= 0.3
    assert result.report.measured_cost == pytest.approx(result.report.predicted_cost, rel=1e-9)


def test_default_calibration_is_the_train_split_and_the_eval_split_is_refused(tiny):
    assert all(item.id.startswith("train-") for item in default_calibration(5))
    from pruneware.evals.datasets import load_benchmark

    reporting = load_benchmark("synthetic", limit=2)  # what `pruneware eval` reports on
    with pytest.raises(CalibrationError, match="eval split"):
        pruneware.tune(*tiny, reporting, {"avg_tokens": 64})


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({}, "exactly one budget"),
        ({"avg_tokens": 64, "flops_ratio": 0.5}, "exactly one budget"),
        ({"avg_tokens": 0}, "avg_tokens must be > 0"),
        ({"flops_ratio": 1.5}, r"flops_ratio must be in \(0, 1\]"),
        ({"latency_ms": -3}, "latency_ms must be > 0"),
        ({"tokens": 64}, "unknown budget 'tokens'; valid budgets: avg_tokens, flops_ratio, latency_ms"),
        ("avg_tokens=lots", "malformed budget"),
        (None, "needs a budget"),
    ],
)
def test_bad_budgets_raise_clear_errors(tiny, budget, message):
    with pytest.raises(BudgetError, match=message):
        pruneware.tune(*tiny, default_calibration(2), budget)


def test_an_unreachable_budget_names_the_valid_range(tiny):
    with pytest.raises(BudgetError, match=r"out of reach.*choose avg_tokens in \[1, 576\]"):
        pruneware.tune(*tiny, default_calibration(2), {"avg_tokens": 0.5})
    with pytest.raises(BudgetError, match="needs no pruning: the unpruned model costs 576"):
        pruneware.tune(*tiny, default_calibration(2), {"avg_tokens": 576})


def _avg_model(n_layers: int = 4, budget: float = 20.0) -> CostModel:
    return cost_model(Budget(avg_tokens=budget), None, [(64, 10)], n_layers)


def test_search_is_exact_for_one_stage_and_stays_within_budget():
    profile = Profile()
    for r, loss in ((0.5, 0.1), (0.25, 0.4), (0.125, 0.3)):  # noisy: 0.125 "better" than 0.25
        profile.add("pre", "random", r, loss)
        profile.add(2, "random", r, loss / 4)
    assert profile.loss("pre", "random", 0.125) == 0.4  # made monotone
    model = _avg_model()
    schedules = search(profile, {"pre": "random", 2: "random"}, ["pre", 2], model, max_stages=2)
    assert schedules and all(s.cost <= 20.0 for s in schedules)
    assert [s.surrogate for s in schedules] == sorted(s.surrogate for s in schedules)
    for s in schedules:
        plan = Plan.parse(",".join(f"random@{p}:{max(1, round(r * 64))}" for p, _, r in s.stages))
        assert model.plan_cost(plan) <= 20.0 + 64 * 0.02  # the grid ratios, rounded to counts
        if len(s.stages) == 1:
            (p, _, r), = s.stages
            assert s.surrogate == pytest.approx(profile.loss(p, "random", r))


def test_fill_spends_the_budget_without_exceeding_it():
    model = _avg_model(budget=20.0)
    plan = fill([("pre", "random", 0.125)], model, 64)
    assert plan is not None and model.plan_cost(plan) <= 20.0
    assert model.plan_cost(plan) > 20.0 - 1.0  # one token short at most
    small = _avg_model(budget=2.0)
    shrunk = fill([("pre", "random", 0.9)], small, 64)  # over budget as given: scaled down to fit
    assert shrunk is not None and small.plan_cost(shrunk) <= 2.0


def test_latency_cost_model_fits_the_timer():
    samples = [(100, 10)]
    model = cost_model(Budget(latency_ms=30.0), None, samples, 4, timer=lambda k: 10.0 + 0.1 * k, n_visual=100)
    assert model.fit["a_ms"] == pytest.approx(10.0, abs=1e-6)
    assert model.fit["b_ms_per_token"] == pytest.approx(0.1, abs=1e-6)
    assert model.unpruned_cost() == pytest.approx(20.0)
    assert model.plan_cost(Plan.parse("random@2:50")) == pytest.approx(10.0 + 0.05 * 100 + 0.05 * 50)
    with pytest.raises(BudgetError, match="out of reach"):
        cost_model(Budget(latency_ms=5.0), None, samples, 4, timer=lambda k: 10.0 + 0.1 * k,
                   n_visual=100).check_reachable()


runner = CliRunner()


def test_cli_json_plan_plugs_into_eval(tmp_path):
    result = runner.invoke(app, ["tune", "--avg-tokens", "96", "--calib", "4", "--policies", "random",
                                 "--max-stages", "2", "--max-places", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    plan = Plan.parse(payload["plan"])
    assert plan.avg_visual_tokens(N_VISUAL, N_LAYERS) <= 96 and payload["budget"] == "avg_tokens=96"
    assert payload["measured_cost"] <= 96 and payload["candidates"]
    result = runner.invoke(app, ["eval", "--plans", payload["plan"], "--limit", "2", "--batch-size", "2",
                                 "--out", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["plan"] == payload["plan"] and row["avg_visual_tokens"] <= 96


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: give exactly one budget: --avg-tokens N, --flops-ratio r or --latency-ms t (got 0)"),
        (["--avg-tokens", "64", "--latency-ms", "9"], "error: give exactly one budget"),
        (["--flops-ratio", "2"], "error: flops_ratio must be in (0, 1]"),
        (["--avg-tokens", "64", "--bench", "nosuch"], "error: unknown benchmark 'nosuch'; valid benchmarks:"),
        (["--avg-tokens", "64", "--calib", "0"], "error: --calib must be >= 1, got 0"),
        (["--avg-tokens", "64", "--max-stages", "5"], "error: --max-stages must be in 1..4, got 5"),
        (["--avg-tokens", "64", "--data", "x.jsonl"], "error: the synthetic benchmark is generated"),
        (["--avg-tokens", "64", "--bench", "jsonl", "--data", "/no/such.jsonl"], "error: /no/such.jsonl: no such"),
        (["--avg-tokens", "64", "--calib", "2", "--policies", "nosuch"], "error: unknown policy 'nosuch'; valid policies:"),
    ],
)
def test_cli_user_mistakes_get_one_line(args, message):
    result = runner.invoke(app, ["tune", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_reads_a_tuned_multi_stage_plan_as_one_plan():
    from pruneware.cli.common import split_plans

    assert split_plans("divprune@pre:308,fastv@1:54,divprune@4:10") == ["divprune@pre:308,fastv@1:54,divprune@4:10"]
    assert split_plans("none,fastv,divprune@pre:0.5") == ["none", "fastv", "divprune@pre:0.5"]
    assert split_plans("random@pre:0.5,divprune@pre:0.25") == ["random@pre:0.5", "divprune@pre:0.25"]  # not one plan


def test_an_unscreened_place_takes_the_policy_best_between_its_neighbours():
    from pruneware.tuning.search import interpolated_choice

    screened = {"pre": {"divprune": 0.3}, 1: {"divprune": 0.33, "random": 1.6}, 7: {"divprune": 0.29, "random": 0.27}}
    assert interpolated_choice(5, screened, ["random", "divprune"]) == "divprune"  # random wins only at 7
    assert interpolated_choice(7, screened, ["random", "divprune"]) == "random"


def test_presets_are_ordered_by_their_surrogate():
    from pruneware.tuning.search import surrogate_of

    profile = Profile()
    profile.add("pre", "divprune", 0.25, 0.2)
    profile.add("pre", "crosslmm", 0.125, 4.0)
    assert surrogate_of(Plan.parse("divprune@pre:16"), profile, 64) == pytest.approx(0.2)
    assert surrogate_of(Plan.parse("crosslmm@pre:4"), profile, 64) == float("inf")  # below what was profiled
    assert surrogate_of(Plan.parse("fastv@2:16"), profile, 64) == float("inf")  # never profiled
