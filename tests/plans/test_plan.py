"""Plan grammar, validation, presets and the avg_tokens solver."""

from __future__ import annotations

import pytest

from pruneware import Plan, PlanError, Stage
from pruneware.plans.avg_tokens import solve_counts
from pruneware.plans.presets import available_presets, get_preset


@pytest.mark.parametrize(
    "text",
    [
        "random@20:0.25",
        "divprune@pre:0.5,random@20:0.2",
        "random@3:64:compact",
        "fastv@2:1.0",
        "divprune[alpha=2;mode=fast]@pre:12",
        "adaptinfer@1:*0.17,adaptinfer@10:*0.6,adaptinfer@20:*0.3",
        "adaptinfer@2:40:compact,adaptinfer@11:12:compact,adaptinfer@21:0:compact",
    ],
)
def test_plan_string_round_trips(text):
    plan = Plan.parse(text)
    assert str(plan) == text
    assert Plan.parse(str(plan)) == plan


def test_stage_fields():
    stage = Stage.parse("random@20:64:compact")
    assert (stage.policy, stage.where, stage.budget, stage.positions) == ("random", 20, 64, "compact")
    assert Stage.parse("divprune@pre:0.5").where == "pre"
    assert Stage.parse("random@4").budget == 0.5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("random@3:0.0", r"ratio must be in \(0, 1\]"),
        ("random@3:1.5", r"ratio must be in \(0, 1\]"),
        ("random@3:-1", "count must be >= 0"),
        ("random@3:*64", r"relative budget \('\*r'\) is a ratio in \(0, 1\], got 64"),
        ("random@3:*1.5", r"ratio must be in \(0, 1\]"),
        ("nosuch@3:0.5", r"unknown policy 'nosuch'; valid policies: adaptinfer, .*crosslmm, .*divprune, .*fastv, .*random, .*vision-score"),
        ("random3:0.5", "malformed stage"),
        ("random@x:0.5", "malformed stage"),
        ("random@3:abc", "malformed budget"),
        ("", "empty plan"),
        ("random@5:0.5,random@3:0.5", "increasing layer order"),
        ("random@3:0.5:sideways", "positions must be one of"),
    ],
)
def test_bad_plans_are_rejected_with_clear_errors(text, match):
    with pytest.raises(PlanError, match=match):
        Plan.parse(text)


def test_layer_range_is_checked_against_the_model():
    plan = Plan.parse("random@8:0.5")
    with pytest.raises(PlanError, match=r"model has 8 decoder layers: use 'pre' or a layer in 0..7"):
        plan.validate_for(8, "1d")
    plan.validate_for(9, "1d")


def test_keep_counts_and_average():
    plan = Plan.parse("divprune@pre:0.5,random@2:0.25")
    assert plan.keep_counts(100) == [50, 25]
    # 2 layers at 50 tokens, 6 layers at 25
    assert plan.avg_visual_tokens(100, 8) == pytest.approx((2 * 50 + 6 * 25) / 8)


def test_presets_scale_with_depth():
    fastv = get_preset("fastv")
    assert fastv.layers(32) == [2] and fastv.layers(16) == [1]
    horizon = get_preset("info-horizon")
    assert horizon.layers(32) == [None, 20] and horizon.layers(8) == [None, 5]
    assert str(horizon.build(32)) == "divprune@pre:0.1667:compact,random@20:0.0174:compact"
    assert str(horizon.build(28, rope="mrope")) == "divprune@pre:0.1667,random@18:0.0174"  # M-RoPE keeps positions
    assert set(available_presets()) >= {"fastv", "random", "divprune", "info-horizon"}
    with pytest.raises(PlanError, match="unknown preset .nope.; valid presets: adaptinfer, adaptinfer-llava-128, adaptinfer-llava-32"):
        get_preset("nope")


@pytest.mark.parametrize("target", [64, 128, 192])
def test_avg_tokens_solver_hits_the_target(target):
    # AdaptInfer's schedule on LLaVA-1.5-7B: layers [1, 10, 20] of 32, 576 visual tokens.
    counts = solve_counts([1, 10, 20], [1.0, 2.0, 3.0], 576, 32, target)
    plan = Plan(tuple(Stage("random", layer, c) for layer, c in zip([1, 10, 20], counts, strict=True)))
    assert counts == sorted(counts, reverse=True)
    assert abs(plan.avg_visual_tokens(576, 32) - target) < 1.0


def test_avg_tokens_out_of_reach_names_the_range():
    with pytest.raises(PlanError, match=r"choose a value in \[36.9, 576\]"):
        get_preset("fastv").build(32, avg_tokens=5, n_visual=576)


def test_relative_budgets_follow_the_current_count_like_the_official_code():
    # AdaptInfer's Qwen2-VL code: k = int(ratio * v_token_num), v_token_num the count the stage receives.
    plan = Plan.parse("adaptinfer@1:*0.17,adaptinfer@10:*0.6,adaptinfer@20:*0.3")
    assert plan.keep_counts(576) == [97, 58, 17]
    # ...computed in float32 (an int64 tensor times a Python float): 0.7 * 90 is 63 there, 62.99... in float64.
    assert Stage.parse("random@3:*0.7").keep_count(100, 90) == 63
    # A count of 0 drops every visual token, and later stages keep 0.
    assert Plan.parse("random@3:40,random@5:0,random@6:*0.5").keep_counts(576) == [40, 0, 0]


def test_zero_budgets_are_refused_where_they_cannot_run():
    from pruneware.integrations.vllm.spec import check_stage

    with pytest.raises(PlanError, match="vLLM needs at least one placeholder token per item"):
        check_stage(Stage.parse("random@pre:0"))


def test_vision_side_stages_count_toward_the_tokens_entering_the_llm():
    plan = Plan.parse("divprune@vit1:144,random@4:*0.5")
    assert plan.entering_llm(576) == 144
    assert plan.keep_counts(576) == [72]
    assert plan.avg_visual_tokens(576, 8) == pytest.approx((4 * 144 + 4 * 72) / 8)
    assert Plan.parse("pixelprune@pre-vit:0.5,divprune@vit2:*0.5").avg_visual_tokens(576, 8) == 144
