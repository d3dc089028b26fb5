"""Recycling as a tuner knob: the search's schedules are verified with their stages recycling,
the variants cost what their schedule costs, the measurement picks, and bad modes are refused.

Small on purpose (4 calibration questions, a restricted search), like tests/tuning/test_tune.py.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import pruneware
from pruneware.cli import app
from pruneware.errors import PlanError
from pruneware.models import available, load
from pruneware.plans.plan import Plan
from pruneware.tuning.calibration import default_calibration
from pruneware.tuning.recycling import checked_modes, variants, with_recycling

N_VISUAL, N_LAYERS = 576, 8
needs_model = pytest.mark.skipif("tiny-llava" not in available(), reason="tiny-llava has no trained weights here")
SMALL = dict(policies=["divprune"], max_stages=2, max_places=3, shortlist=2)


def test_variants_recycle_the_in_llm_stages_then_every_stage():
    plan = Plan.parse("divprune@pre:158,divprune@1:79,divprune@3:39")
    got = [(str(p), where) for p, where in variants(plan, "nearest")]
    assert got == [
        ("divprune@pre:158,divprune[recycle=nearest]@1:79,divprune[recycle=nearest]@3:39", "in-LLM stages"),
        ("divprune[recycle=nearest]@pre:158,divprune[recycle=nearest]@1:79,divprune[recycle=nearest]@3:39",
         "every stage"),
    ]
    for variant, _ in variants(plan, "context"):  # same counts and places: the same cost under any budget
        assert [(s.where, s.budget) for s in variant.stages] == [(s.where, s.budget) for s in plan.stages]
        assert variant.avg_visual_tokens(N_VISUAL, N_LAYERS) == plan.avg_visual_tokens(N_VISUAL, N_LAYERS)


def test_variants_skip_duplicates_and_keep_an_explicit_recycle():
    pre_only = Plan.parse("divprune@pre:64")  # no in-LLM stage: only the every-stage variant
    assert [(str(p), w) for p, w in variants(pre_only, "nearest")] == [
        ("divprune[recycle=nearest]@pre:64", "every stage")]
    llm_only = Plan.parse("divprune@2:64")  # both variants are the same plan: listed once
    assert [str(p) for p, _ in variants(llm_only, "nearest")] == ["divprune[recycle=nearest]@2:64"]
    mixed = Plan.parse("divprune[recycle=context]@pre:128,divprune@2:64")
    assert [str(p) for p, _ in variants(mixed, "nearest")] == [
        "divprune[recycle=context]@pre:128,divprune[recycle=nearest]@2:64"]
    assert variants(Plan.parse("divprune[recycle=nearest]@2:64"), "nearest") == []


@pytest.mark.parametrize(("given", "expected"), [
    ("nearest", ("nearest",)), ("nearest,context,nearest", ("nearest", "context")), ("none", ()),
    ((), ()), (None, ()), (["context"], ("context",)),
])
def test_checked_modes(given, expected):
    assert checked_modes(given) == expected


def test_an_unknown_mode_is_refused_naming_the_valid_ones():
    with pytest.raises(PlanError, match="valid: none, nearest, context"):
        checked_modes("nearst")


@needs_model
def test_with_recycling_skips_presets_and_plans_a_policy_refuses():
    model, _ = load("tiny-llava")
    searched = Plan.parse("divprune@pre:128,divprune@2:64")
    merging = Plan.parse("resize@pre:128,divprune@2:64")  # resize merges already: refuses recycle
    preset = Plan.parse("divprune@pre:64")
    out = with_recycling(model, {str(searched): (searched, "search"), str(merging): (merging, "search"),
                                 str(preset): (preset, "preset divprune")}, ("nearest",))
    assert list(out) == [
        str(searched), "divprune@pre:128,divprune[recycle=nearest]@2:64",
        "divprune[recycle=nearest]@pre:128,divprune[recycle=nearest]@2:64",
        str(merging), "resize@pre:128,divprune[recycle=nearest]@2:64",
        str(preset),
    ]
    assert out["divprune@pre:128,divprune[recycle=nearest]@2:64"][1] == "search + recycle=nearest (in-LLM stages)"


@needs_model
def test_tune_verifies_recycled_schedules_and_chooses_by_measurement():
    model, processor = load("tiny-llava")
    result = pruneware.tune(model, processor, default_calibration(4, seed=3), {"avg_tokens": 64},
                            recycle="nearest", **SMALL)
    verified = [c for c in result.report.candidates if c["phase"] == "verify"]
    recycled = [c for c in verified if "recycle=nearest" in c["plan"]]
    assert recycled and all("+ recycle=nearest" in c["origin"] for c in recycled)
    assert all(c["predicted_cost"] <= 64 for c in verified)
    assert result.report.chosen["loss"] == min(c["loss"] for c in verified)
    assert result.plan.avg_visual_tokens(N_VISUAL, N_LAYERS) <= 64
    off = pruneware.tune(model, processor, default_calibration(4, seed=3), {"avg_tokens": 64}, recycle=(), **SMALL)
    assert not any("recycle" in c["plan"] for c in off.report.candidates)


def test_cli_refuses_an_unknown_recycling_mode():
    result = CliRunner().invoke(app, ["tune", "--avg-tokens", "64", "--recycle", "merge"])
    assert result.exit_code == 2 and "valid: none, nearest, context" in result.output
