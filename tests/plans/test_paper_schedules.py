"""The papers' exact schedules: official layers, counts and positions, and their true averages.

The expected values are written out here from the official sources (not read back from
pruneware.plans.schedules): AdaptInfer-base `score.py` (`pruning_loc`, `sparse_token_dict`),
`model_vqa_qwen.py` (`--pruning-loc 0 9 19`), and the Information Horizon paper's schedules.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import PlanError
from pruneware.plans.presets import get_preset
from tests.tiny import llava_inputs, qwen_media_inputs, tiny_llava, tiny_qwen2_vl

# name: (stage layers, counts on 576 visual tokens, positions, depth, true average per layer)
EXACT = {
    "adaptinfer-llava-128": ([2, 11, 21], [290, 72, 18], "compact", 32, 146.25),
    "adaptinfer-llava-64": ([2, 11, 21], [133, 27, 3], "compact", 32, 82.875),
    "adaptinfer-llava-48": ([2, 11, 21], [80, 24, 2], "compact", 32, 66.6875),
    "adaptinfer-llava-32": ([2, 11, 21], [40, 12, 0], "compact", 32, 51.0),
    # Qwen2-VL: ratios of the tokens left, int()-truncated; 576 tokens = a 672 x 672 image.
    "adaptinfer-qwen2vl-10": ([1, 10, 20], [97, 58, 17], "keep", 28, 2165 / 28),
    "adaptinfer-qwen2vl-30": ([1, 10, 20], [288, 172, 51], "keep", 28, 5296 / 28),
    "adaptinfer-qwen2vl-50": ([1, 10, 20], [403, 362, 108], "keep", 28, 8687 / 28),
    "info-horizon-64": (["pre", 20], [96, 10], "compact", 32, 63.75),
    "info-horizon-192": (["pre", 20], [284, 38], "compact", 32, 191.75),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_schedule_has_the_official_layers_counts_and_positions(name):
    layers, counts, positions, depth, average = EXACT[name]
    plan = get_preset(name).build(depth)
    assert [s.where for s in plan.stages] == layers
    assert plan.keep_counts(576) == counts
    assert {s.positions for s in plan.stages} == {positions}
    assert plan.avg_visual_tokens(576, depth) == pytest.approx(average)
    with pytest.raises(PlanError, match=rf"preset '{name}' is a paper's exact schedule; it takes no avg_tokens"):
        get_preset(name).build(depth, avg_tokens=64, n_visual=576)


def test_adaptinfer_qwen_ratios_are_relative_to_the_tokens_left():
    plan = get_preset("adaptinfer-qwen2vl-10").build(28)
    assert all(s.relative for s in plan.stages)
    assert plan.keep_counts(100) == [17, 10, 3]  # int(17.0), int(0.6 * 17), int(0.3 * 10)


def test_scaled_presets_default_to_the_paper_schedules():
    assert str(get_preset("adaptinfer").build(32)) == (
        "adaptinfer@2:0.231:compact,adaptinfer@11:0.046875:compact,adaptinfer@21:0.0052:compact"
    )
    assert get_preset("adaptinfer").build(32).keep_counts(576) == [133, 27, 3]
    assert str(get_preset("adaptinfer").build(28, rope="mrope")) == str(get_preset("adaptinfer-qwen2vl-10").build(28))
    assert get_preset("info-horizon").build(32).keep_counts(576) == [96, 10]
    # avg_tokens solves the schedule for a true average; at 64 it lands on the paper's own counts.
    assert get_preset("info-horizon").build(32, avg_tokens=64, n_visual=576).keep_counts(576) == [96, 10]


def test_llava_schedules_run_end_to_end_with_their_true_average():
    model = tiny_llava("sdpa", layers=32, image_size=336)  # 576 visual tokens, 32 layers
    inputs = llava_inputs(model, [(5, 1, 9)])
    for name in ("adaptinfer-llava-64", "adaptinfer-llava-32", "info-horizon-64"):
        _, counts, _, _, average = EXACT[name]
        with pruneware.prune(model, name) as run, torch.no_grad():
            model(**inputs)
        assert [k.numel() for s in run.report.stages for k in s.kept] == counts
        assert run.report.avg_visual_tokens == pytest.approx(average)


def test_qwen2_vl_schedule_runs_end_to_end_with_its_true_average():
    model = tiny_qwen2_vl("sdpa", layers=28)
    inputs = qwen_media_inputs(model, [[5, ("image", 48, 48), 9]])  # 576 visual tokens
    with pruneware.prune(model, "adaptinfer-qwen2vl-10") as run, torch.no_grad():
        model(**inputs)
    assert [s.kept[0].numel() for s in run.report.stages] == [97, 58, 17]
    assert run.report.avg_visual_tokens == pytest.approx(2165 / 28)
