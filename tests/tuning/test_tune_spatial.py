"""DivPrune's grid term as a tuner knob: the search's schedules starting with DivPrune at `pre`
are verified with `spatial=w` too, at the same cost, the measurement picks, bad weights are refused.

Small on purpose (4 calibration questions, a restricted search), like tests/tuning/test_tune.py.
"""

from __future__ import annotations

import pytest

import pruneware
from pruneware.errors import PlanError
from pruneware.models import available, load
from pruneware.plans.plan import Plan
from pruneware.tuning.calibration import default_calibration
from pruneware.tuning.spatial import checked_weights, spatial_variant, with_spatial

N_VISUAL, N_LAYERS = 576, 8
needs_model = pytest.mark.skipif("tiny-llava" not in available(), reason="tiny-llava has no trained weights here")
SMALL = dict(policies=["divprune"], max_stages=2, max_places=3, shortlist=2)


def test_the_variant_sets_the_pre_stage_only_at_the_same_cost():
    plan = Plan.parse("divprune[recycle=nearest]@pre:158,divprune[recycle=nearest]@1:79,divprune@3:39")
    variant = spatial_variant(plan, 0.5)
    assert str(variant) == "divprune[recycle=nearest;spatial=0.5]@pre:158,divprune[recycle=nearest]@1:79,divprune@3:39"
    assert variant.avg_visual_tokens(N_VISUAL, N_LAYERS) == plan.avg_visual_tokens(N_VISUAL, N_LAYERS)


@pytest.mark.parametrize("text", ["random@pre:64", "divprune@2:64", "divprune[spatial=0.25]@pre:64,divprune@2:32"])
def test_no_variant_without_a_plain_divprune_stage_at_pre(text):
    assert spatial_variant(Plan.parse(text), 0.5) is None


def test_with_spatial_follows_each_searched_plan_and_skips_presets():
    searched = Plan.parse("divprune@pre:128,divprune@2:64")
    preset = Plan.parse("divprune@pre:64")
    out = with_spatial({str(searched): (searched, "search"), str(preset): (preset, "preset divprune")}, (0.25, 1.0))
    assert list(out) == [str(searched), "divprune[spatial=0.25]@pre:128,divprune@2:64",
                         "divprune[spatial=1.0]@pre:128,divprune@2:64", str(preset)]
    assert out["divprune[spatial=1.0]@pre:128,divprune@2:64"][1] == "search + spatial=1 (pre stage)"


@pytest.mark.parametrize(("given", "expected"), [
    ("0.25,0.5,0.25", (0.25, 0.5)), ("none", ()), ("", ()), (None, ()), ((), ()), ([1], (1.0,)),
])
def test_checked_weights(given, expected):
    assert checked_weights(given) == expected


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "nan", [True]])
def test_a_bad_weight_is_refused_naming_the_valid_range(bad):
    with pytest.raises(PlanError, match="valid are finite numbers > 0"):
        checked_weights(bad)


@needs_model
def test_tune_verifies_spatial_variants_and_chooses_by_measurement():
    model, processor = load("tiny-llava")
    result = pruneware.tune(model, processor, default_calibration(4, seed=3), {"avg_tokens": 64},
                            recycle=(), spatial="0.5", **SMALL)
    verified = [c for c in result.report.candidates if c["phase"] == "verify"]
    gridded = [c for c in verified if "spatial=0.5" in c["plan"]]
    assert gridded and all(c["origin"].endswith("+ spatial=0.5 (pre stage)") for c in gridded)
    assert all(c["predicted_cost"] <= 64 for c in verified)
    assert result.report.chosen["loss"] == min(c["loss"] for c in verified)


def test_cli_refuses_a_bad_spatial_weight():
    from typer.testing import CliRunner

    from pruneware.cli import app

    result = CliRunner().invoke(app, ["tune", "--avg-tokens", "64", "--spatial", "-0.5"])
    assert result.exit_code == 2 and "valid are finite numbers > 0" in result.output
